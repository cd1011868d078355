"""WebDataset streams -> processed examples, with bad samples skipped, counted and reported.

Training reads each dataset as resampled shards (webdataset's own ResampledShards, so a stream
never ends and nodes/workers draw independently), shuffles in a buffer and mixes datasets by
weight. Evaluation reads a split once, in order. A sample that cannot be decoded or processed
is skipped with its key and shard in the log; too many of them stop the run.
"""
from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image

from encoders import load_audio
from omni.config import ConfigError
from omni.data.manifest import DatasetEntry
from omni.errors import SampleError

log = logging.getLogger(__name__)

EXTENSIONS = {
    "image": ("jpg", "jpeg", "png", "webp"),
    "video": ("mp4", "webm"),
    "audio": ("wav", "flac", "mp3"),
}


class TooManyBadSamples(RuntimeError):
    pass


@dataclass
class SkipCounter:
    """Counts good and skipped samples; raises once the skipped fraction passes `max_fraction`."""
    max_fraction: float = 0.01
    min_seen: int = 200              # don't judge the rate on the first few samples
    good: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def ok(self) -> None:
        self.good += 1

    def skip(self, where: str, err: Exception) -> None:
        self.skipped += 1
        msg = f"skipped {where}: {err}"
        if len(self.reasons) < 20:
            self.reasons.append(msg)
        log.warning(msg)
        seen = self.good + self.skipped
        if seen >= self.min_seen and self.skipped / seen > self.max_fraction:
            raise TooManyBadSamples(
                f"{self.skipped} of {seen} samples skipped (> {self.max_fraction:.1%}); first reasons:\n  "
                + "\n  ".join(self.reasons)
            )

    def handler(self, exn: Exception) -> bool:
        """webdataset handler: a corrupt shard/member is counted and the stream goes on."""
        self.skip("shard read", exn)
        return True


def where(raw: dict) -> str:
    """'sample KEY in SHARD' (or a record's own `__where__`, e.g. FILE:LINE), for messages."""
    return raw.get("__where__") or f"sample {raw.get('__key__', '?')} in {raw.get('__url__', '?')}"


def read_json(raw: dict) -> dict:
    """The sample's json member, parsed (an object)."""
    if "json" not in raw:
        raise SampleError(f"{where(raw)}: missing the required 'json' member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"{where(raw)}: field 'json' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{where(raw)}: field 'json' must be an object")
    return meta


def read_meta(raw: dict) -> dict:
    """The sample's json member, parsed, with `messages` checked to be a list of {role, content}."""
    meta = read_json(raw)
    messages = meta.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise SampleError(f"{where(raw)}: field 'json.messages' must be a list of {{role, content}}")
    return meta


def decode_sample(raw: dict) -> tuple[dict, list[dict], dict[str, list]]:
    """Raw tar members -> (meta json, messages, media by modality in index order)."""
    meta = read_meta(raw)
    messages = meta["messages"]
    media: dict[str, list] = {}
    for modality, exts in EXTENSIONS.items():
        found = []
        for key, value in raw.items():
            stem, _, ext = key.rpartition(".") if "." in key else ("", "", key)
            if ext.lower() in exts:
                index = int(stem) if stem.isdigit() else 0
                found.append((index, key, value))
        for _, key, value in sorted(found):
            try:
                if modality == "image":
                    item = Image.open(io.BytesIO(value)).convert("RGB")
                elif modality == "audio":
                    item = load_audio(value)
                else:
                    item = value  # video bytes; frames are sampled by the processor
            except Exception as e:  # noqa: BLE001 - any decoder failure means a bad member
                raise SampleError(f"{where(raw)}: field '{key}' does not decode ({e})") from None
            media.setdefault(modality, []).append(item)
    return meta, messages, media


def training_stream(entries: list[DatasetEntry], weights: list[float], seed: int,
                    shuffle_buffer: int, counter: SkipCounter, rank: int = 0,
                    world_size: int = 1) -> Iterator[dict]:
    """Endless raw samples mixed by weight, deterministic for a given seed. Every rank draws the
    same sequence and keeps every `world_size`-th sample from offset `rank`, so the ranks together
    see exactly what one process would (undecoded members of other ranks are cheap to pass over)."""
    pipes = []
    for i, entry in enumerate(entries):
        pipes.append(wds.DataPipeline(
            # worker_seed: the same shard sequence on every rank (ranks stride over it below)
            wds.ResampledShards(entry.urls, seed=seed * 1000 + i, deterministic=True, worker_seed=lambda: 0),
            wds.tarfile_to_samples(handler=counter.handler),
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed * 1000 + i)),
        ))
    for i, sample in enumerate(mix_by_weight([iter(p) for p in pipes], weights, random.Random(seed))):
        if i % world_size == rank:
            yield sample


def mix_by_weight(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Endless samples, each from a stream drawn by weight with `rng` (wds.RandomMix draws from the
    global `random`, so it could not be seeded per stream)."""
    total = sum(weights)
    probs = [w / total for w in weights]
    while True:
        yield next(streams[rng.choices(range(len(streams)), probs)[0]])


def split_stream(entry: DatasetEntry, counter: SkipCounter) -> Iterator[dict]:
    """Every sample of one dataset once, in shard order (evaluation)."""
    return iter(wds.DataPipeline(
        wds.SimpleShardList(entry.urls),
        wds.tarfile_to_samples(handler=counter.handler),
    ))


class ExampleStream:
    """Raw samples -> training items by `make(raw)` (the stage method's, omni/align/methods.py);
    a sample `make` rejects is skipped, counted and named. Counts raw samples consumed so a
    resume can skip them."""

    def __init__(self, raw: Iterator[dict], make, counter: SkipCounter):
        self.raw, self.make, self.counter = raw, make, counter
        self.consumed = 0

    def skip(self, n: int) -> None:
        """Advance past `n` raw samples without decoding them (exact resume)."""
        for _ in range(n):
            next(self.raw)
            self.consumed += 1

    def state(self) -> int:
        """This rank's position for a checkpoint: raw samples consumed."""
        return self.consumed

    def restore(self, state: int) -> None:
        """Continue from `state()` of an earlier run (before the first take)."""
        if not isinstance(state, int):
            raise ConfigError(f"the checkpoint's data position {state!r} was written by data.partition: shard; "
                              "resume with data.partition: shard (as when it was written)")
        self.skip(state)

    def take(self, k: int) -> list:
        out = []
        while len(out) < k:
            raw = next(self.raw)
            self.consumed += 1
            try:
                out.append(self.make(raw))
            except Exception as e:  # noqa: BLE001 - counted, reported with key+shard, rate-limited
                self.counter.skip(where(raw), e)
                continue
            self.counter.ok()
        return out

"""WebDataset samples: their members decoded, bad samples counted and reported.

One decoder for media members (`decode_media`), used for whole samples (`decode_sample`) and for
the undecoded media a record keeps (omni/data/records.py). A sample that cannot be decoded or
processed is skipped with its key and shard in the log; too many of them stop the run
(`SkipCounter`). Evaluation reads a split once, in order (`split_stream`); the training streams are
omni/data/stream.py and omni/data/sharded.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image

from encoders import load_audio
from omni.data.manifest import DatasetEntry
from omni.errors import SampleError
from omni.modalities import EXTENSIONS, PLACEHOLDERS, input_member

ROLES = ("system", "user", "assistant")
# typed content parts (OpenAI / transformers chat format) -> the modality whose placeholder they stand for
MEDIA_PARTS = {"image": "image", "image_url": "image", "video": "video", "video_url": "video",
               "audio": "audio", "input_audio": "audio", "audio_url": "audio"}

log = logging.getLogger(__name__)



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
    quiet: bool = False              # replaying a resume: already reported

    def ok(self) -> None:
        self.good += 1

    def state(self) -> list[int]:
        """[good, skipped]: what a checkpoint keeps, so the budget means the same after a resume."""
        return [self.good, self.skipped]

    @contextlib.contextmanager
    def replaying(self, state: list[int]):
        """A resume passes over samples before its checkpoint (the few between a saved pipeline
        state and its position, or all of them in a replay): their bad reads were counted when
        first met, so inside this block nothing is counted or raised; afterwards the counts are the
        checkpoint's `state()`."""
        self.quiet = True
        try:
            yield
        finally:
            self.quiet = False
            self.good, self.skipped = (int(x) for x in state)

    def skip(self, where: str, err: Exception) -> None:
        self.skipped += 1
        if self.quiet:
            return
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
        dotted = [k for k in raw if k.endswith(".json")]
        if dotted:  # KEY.X.json: webdataset ends a sample's key at the first dot of the file name
            raise SampleError(f"{where(raw)}: the shard's file names have a dot in the sample key "
                              f"({raw.get('__key__')}.{dotted[0]}): webdataset splits a name at its first dot, so "
                              "rename the tar members to KEY.json, KEY.jpg, ... with no dot in KEY")
        raise SampleError(f"{where(raw)}: missing the required 'json' member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"{where(raw)}: field 'json' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{where(raw)}: field 'json' must be an object")
    return meta


def chat_turns(messages, place: str, field: str = "messages") -> list[dict]:
    """`messages` checked (roles system/user/assistant, each with content) with every content a
    string: a list of typed parts (`[{"type": "text", "text": ...}, {"type": "image"}]`, the
    OpenAI / transformers form) becomes its texts and placeholders joined by spaces. A media part
    stands for the sample's next media member of its kind; a url or data inside it is not read."""
    if not isinstance(messages, list):
        raise SampleError(f"{place}: field '{field}' must be a list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SampleError(f"{place}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SampleError(f"{place}: field '{field}[{i}].role' is {m['role']!r}; use one of {list(ROLES)}")
        out.append({**m, "content": content_text(m["content"], place, f"{field}[{i}].content")})
    return out


def content_text(content, place: str, field: str) -> str:
    """A message content as one string: itself, or its typed parts (see `chat_turns`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SampleError(f"{place}: field '{field}' must be a string or a list of typed parts")
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in MEDIA_PARTS:
            pieces.append(PLACEHOLDERS[MEDIA_PARTS[kind]])
        else:
            raise SampleError(f"{place}: field '{field}[{j}]' must be {{\"type\": \"text\", \"text\": str}} or a "
                              f"media part of type {sorted(MEDIA_PARTS)}; got {part!r:.80}")
    return " ".join(pieces)


def read_meta(raw: dict) -> dict:
    """The sample's json member, parsed, with `messages` checked and normalised by `chat_turns`."""
    meta = read_json(raw)
    meta["messages"] = chat_turns(meta.get("messages"), where(raw), "json.messages")
    return meta


def decode_media(members: dict, place: str) -> dict[str, list]:
    """Media members (`0.jpg`, `1.wav`, `mp4`, ...) -> decoded media by modality, each in index order
    (a bare `jpg` is index 0): images as RGB PIL images, audio as waveforms, video as its bytes
    (the processor samples frames). `place` names the sample in errors. Other members, and the
    spoken answer (`answer.wav`, an output, not an input), are ignored."""
    media: dict[str, list] = {}
    for modality in EXTENSIONS:
        found = sorted((kind[1], key, value) for key, value in members.items()
                       if (kind := input_member(key)) and kind[0] == modality)
        for _, key, value in found:
            try:
                if modality == "image":
                    item = Image.open(io.BytesIO(value)).convert("RGB")
                elif modality == "audio":
                    item = load_audio(value)
                else:
                    item = value  # video bytes; frames are sampled by the processor
            except Exception as e:  # noqa: BLE001 - any decoder failure means a bad member
                raise SampleError(f"{place}: field '{key}' does not decode ({e})") from None
            media.setdefault(modality, []).append(item)
    return media


def decode_sample(raw: dict) -> tuple[dict, list[dict], dict[str, list]]:
    """Raw tar members -> (meta json, messages, media by modality in index order)."""
    meta = read_meta(raw)
    return meta, meta["messages"], decode_media(raw, where(raw))


def split_stream(entry: DatasetEntry, counter: SkipCounter) -> Iterator[dict]:
    """Every sample of one dataset once, in shard order (evaluation)."""
    return iter(wds.DataPipeline(
        wds.SimpleShardList(entry.urls),
        wds.tarfile_to_samples(handler=counter.handler),
    ))

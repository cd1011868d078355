"""`omni data stats`: per-dataset counts, modality mix and token-length histograms -> table + PNG.

What is counted, per sample:
- **text tokens**: with `--model DIR` (an omni model folder), the tokenizer's chat template over
  the sample's messages (special and template tokens included), minus one token per media
  placeholder (each placeholder token is replaced by media tokens); without a model, the number of
  whitespace-separated words of the messages' contents, placeholders removed.
- **media tokens**: what the processor will put in place of each placeholder, from the model's
  own token arithmetic (`image_tokens()`, `video_tokens(frames)`, `audio_window_tokens(valid)`),
  of the model folder or of a preset on the meta device (`--preset`, no weights):
    image  AnyRes tiles for the image's size (`encoders.num_tiles`) x image_tokens()
    video  video_tokens(frames), frames = len(sample_frame_indices(...)) at the preset's fps/cap
    audio  per whisper window: audio_window_tokens(valid_frames(window samples)), summed
  Headers only where possible (image size, video frame count and rate); audio is decoded
  (PyAV, resampled to 16 kHz, as training does) to count samples.
- **total** = text + media tokens: the sequence length the trainer packs.

Histograms use fixed log-spaced bins (8 per octave, exact below 16), so memory does not grow
with the data; percentiles are read from the bins (upper edge: <= 9 % above the true value).
Accumulators merge (`DatasetStats.merge`): the map is `SampleStats` per sample, the reduce a merge.
"""
from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from omni.curate.common import (
    CurationError,
    Unreadable,
    conversation_text,
    map_samples,
    media_members,
    write_json,
)
from omni.data.loader import read_meta
from omni.data.manifest import load_manifest
from omni.errors import SampleError
from omni.modalities import PLACEHOLDERS, SPOKEN_ANSWER

log = logging.getLogger(__name__)

EDGES = np.unique(np.concatenate([np.arange(16), np.round(2 ** (np.arange(32, 8 * 24 + 1) / 8))])).astype(np.int64)
METRICS = ("text", "media", "total")


class TokenCounter:
    """Token arithmetic of a model (or a preset's meta-device model) and optionally its tokenizer."""

    def __init__(self, model, tokenizer=None):
        self.tokenizer = tokenizer
        self.image_tokens = model.image_tokens()
        self.video_tokens = model.video_tokens
        self.audio_window_tokens = model.audio_window_tokens
        self.tile = model.encoders["image"].image_size
        self.anyres = model.config.anyres
        self.video = model.config.video
        audio = model.encoders["audio"]
        self.window = audio.window_samples
        self.valid_frames = audio.valid_frames
        self.name = model.config.name

    @classmethod
    def from_preset(cls, preset: str) -> "TokenCounter":
        from omni.model.table import meta_model

        return cls(meta_model(preset))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "TokenCounter":
        from omni.model.load import load_model

        model, tokenizer = load_model(model_dir)
        return cls(model, tokenizer)

    def text(self, messages: list[dict]) -> int:
        if self.tokenizer is None:
            return len(conversation_text(messages).split())
        enc = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        n_ph = sum(str(m.get("content", "")).count(p) for m in messages for p in PLACEHOLDERS.values())
        return len(enc["input_ids"]) - n_ph

    def media(self, kind: str, data: bytes) -> int:
        if kind == "image":
            from encoders import num_tiles

            with Image.open(io.BytesIO(data)) as im:  # header only
                w, h = im.size
            return num_tiles(w, h, self.tile, self.anyres) * self.image_tokens
        if kind == "video":
            import decord

            from encoders import sample_frame_indices

            reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
            frames = sample_frame_indices(len(reader), float(reader.get_avg_fps()), self.video.fps,
                                          self.video.max_frames)
            return self.video_tokens(len(frames))
        from encoders import load_audio

        n = len(load_audio(data))
        if n == 0:
            raise ValueError("audio has no samples")
        full, rest = divmod(n, self.window)
        return (full * self.audio_window_tokens(self.valid_frames(self.window))
                + (self.audio_window_tokens(self.valid_frames(rest)) if rest else 0))


@dataclass
class SampleStats:
    text: int
    media: int
    kinds: dict[str, int]           # media count per kind
    spoken: bool = False            # has a spoken answer (answer.wav): an output, not a medium

    @property
    def total(self) -> int:
        return self.text + self.media

    @property
    def mix(self) -> str:
        return "+".join(k for k in PLACEHOLDERS if self.kinds.get(k)) or "text"


def sample_stats(meta: dict, raw: dict, counter: TokenCounter) -> SampleStats:
    """The map step: one raw sample -> its token counts and media kinds."""
    kinds: Counter = Counter()
    media = 0
    for kind, _, key, value in media_members(raw):
        try:
            media += counter.media(kind, value)
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad member
            raise SampleError(f"field {key!r} does not decode ({e})") from None
        kinds[kind] += 1
    return SampleStats(counter.text(meta["messages"]), media, dict(kinds), SPOKEN_ANSWER in raw)


@dataclass
class DatasetStats:
    name: str
    split: str
    manifest_samples: int = 0
    samples: int = 0
    bad: int = 0
    mix: Counter = field(default_factory=Counter)
    media_files: Counter = field(default_factory=Counter)
    spoken_answers: int = 0
    hist: dict = field(default_factory=lambda: {m: np.zeros(len(EDGES), np.int64) for m in METRICS})
    sums: Counter = field(default_factory=Counter)
    maxima: Counter = field(default_factory=Counter)

    def add(self, s: SampleStats) -> None:
        self.samples += 1
        self.mix[s.mix] += 1
        self.media_files.update(s.kinds)
        self.spoken_answers += s.spoken
        for m, v in (("text", s.text), ("media", s.media), ("total", s.total)):
            self.hist[m][np.searchsorted(EDGES, v, side="right") - 1] += 1
            self.sums[m] += v
            self.maxima[m] = max(self.maxima[m], v)

    def merge(self, other: "DatasetStats") -> "DatasetStats":
        self.samples += other.samples
        self.bad += other.bad
        self.mix.update(other.mix)
        self.media_files.update(other.media_files)
        self.spoken_answers += other.spoken_answers
        for m in METRICS:
            self.hist[m] += other.hist[m]
            self.sums[m] += other.sums[m]
            self.maxima[m] = max(self.maxima[m], other.maxima[m])
        return self

    def mean(self, m: str) -> float:
        return self.sums[m] / self.samples if self.samples else 0.0

    def quantile(self, m: str, q: float) -> int:
        """Upper edge of the bin holding the q-quantile (exact below 16; <= 9 % high above)."""
        if not self.samples:
            return 0
        cum = np.cumsum(self.hist[m])
        i = int(np.searchsorted(cum, q * self.samples, side="left"))
        upper = EDGES[i + 1] - 1 if i + 1 < len(EDGES) else EDGES[i]
        return int(min(upper, self.maxima[m]))

    def to_dict(self) -> dict:
        return {
            "name": self.name, "split": self.split, "samples": self.samples, "bad": self.bad,
            "manifest_samples": self.manifest_samples,
            "modality_mix": dict(self.mix.most_common()),
            "media_files": {k: self.media_files[k] for k in PLACEHOLDERS if self.media_files.get(k)},
            "spoken_answers": self.spoken_answers,
            "tokens": {m: {"sum": int(self.sums[m]), "mean": round(self.mean(m), 2), "max": int(self.maxima[m]),
                           "p50": self.quantile(m, 0.5), "p90": self.quantile(m, 0.9), "p99": self.quantile(m, 0.99),
                           "histogram": {"edges": EDGES.tolist(), "counts": self.hist[m].tolist()}}
                       for m in METRICS},
        }


@dataclass
class StatsResult:
    datasets: list[DatasetStats]
    table: str
    table_file: Path
    json_file: Path
    png_file: Path
    seconds: float


def _measure(raw: dict, counter: TokenCounter) -> SampleStats | SampleError:
    """The map step with every failure as a value: any decoder error means a bad sample, never a stop."""
    try:
        return sample_stats(read_meta(raw), raw, counter)
    except Exception as e:  # noqa: BLE001 - a bad sample is counted and logged, never fatal
        return SampleError(f"{raw.get('__key__', '?')}: {e}")


def collect(manifest: str | Path, counter: TokenCounter, split: str | None = None,
            datasets: list[str] | None = None, limit: int | None = None, progress: bool = True,
            backend=None) -> list[DatasetStats]:
    """Per-dataset stats of every selected sample (the first `limit` per dataset); `backend`: None
    measures here, a `RayBackend` on Ray (the counts are added up here in the same order)."""
    m = load_manifest(manifest)
    entries = [d for d in m.datasets if (split is None or d.split == split) and (not datasets or d.name in datasets)]
    missing = sorted(set(datasets or []) - {d.name for d in entries})
    if missing or not entries:
        raise CurationError(f"manifest {manifest}: no dataset(s) {missing or datasets or ''} "
                            f"in split {split or 'any'}; available: {sorted({d.name for d in m.datasets})}")
    total = sum(min(e.num_samples, limit) if limit else e.num_samples for e in entries)
    bar = tqdm(total=total or None, unit="sample", desc="stats", disable=not progress)
    out = [DatasetStats(e.name, e.split, manifest_samples=e.num_samples) for e in entries]
    measure = partial(_measure, counter=counter)
    samples = (map_samples(entries, measure, limit) if backend is None
               else backend.map_samples(entries, measure, keep_raw=False, limit=limit))
    for (di, _, p), raw, result in samples:
        st = out[di]
        if limit is not None and st.samples + st.bad >= limit:
            continue                        # past the limit: the rest of this dataset is not counted
        if isinstance(raw, Unreadable):
            st.bad += 1
            continue
        bar.update()
        if isinstance(result, SampleStats):
            st.add(result)
        else:
            st.bad += 1
            log.warning("stats: %s sample %d: %s", st.name, p, result)
    bar.close()
    return out


def format_table(stats: list[DatasetStats], counter_name: str, text_unit: str) -> str:
    head = ("| dataset | split | samples | bad | modality mix | media files | spoken answers "
            "| text tok mean / p50 / p90 / max | media tok mean / max | total tok mean / p90 / max | total tokens |")
    lines = [f"Token counts: text = {text_unit}; media = `{counter_name}` token arithmetic.", "", head,
             "|" + "---|" * 11]
    for s in stats:
        mix = ", ".join(f"{k} {100 * v / max(s.samples, 1):.0f}%" for k, v in s.mix.most_common()) or "-"
        files = ", ".join(f"{k} {s.media_files[k]}" for k in PLACEHOLDERS if s.media_files.get(k)) or "-"
        flag = "" if s.samples + s.bad == s.manifest_samples else f" (manifest: {s.manifest_samples})"
        lines.append(
            f"| {s.name} | {s.split} | {s.samples}{flag} | {s.bad} | {mix} | {files} | {s.spoken_answers} "
            f"| {s.mean('text'):.1f} / {s.quantile('text', .5)} / {s.quantile('text', .9)} / {s.maxima['text']} "
            f"| {s.mean('media'):.1f} / {s.maxima['media']} "
            f"| {s.mean('total'):.1f} / {s.quantile('total', .9)} / {s.maxima['total']} | {s.sums['total']:,} |")
    return "\n".join(lines)


def plot(stats: list[DatasetStats], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    edges = np.append(EDGES, EDGES[-1] * 2).astype(float)
    for ax, m in zip(axes.flat[:3], METRICS):
        for s in stats:
            if not s.samples:
                continue
            nz = np.nonzero(s.hist[m])[0]
            lo, hi = max(nz.min() - 1, 0), min(nz.max() + 2, len(EDGES))
            ax.stairs(s.hist[m][lo:hi] / s.samples, edges[lo:hi + 1], label=f"{s.name}/{s.split}")
        ax.set_xscale("symlog", linthresh=1, linscale=0.3)
        ax.set_xlabel(f"{m} tokens per sample (bins: exact below 16, then 1/8 octave)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{m} tokens")
    ax = axes.flat[3]
    combos = sorted({k for s in stats for k in s.mix})
    labels = [f"{s.name}/{s.split}" for s in stats]
    bottom = np.zeros(len(stats))
    for combo in combos:
        frac = np.array([s.mix.get(combo, 0) / max(s.samples, 1) for s in stats])
        ax.barh(labels, frac, left=bottom, label=combo)
        bottom += frac
    ax.set_xlabel("fraction of samples")
    ax.set_title("modality mix")
    ax.legend(fontsize=8, loc="lower right")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title, y=0.99, fontsize=10)
    if handles:
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=min(len(names), 6),
                   fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stats(manifest: str | Path, out_dir: str | Path, preset: str = "7b", model_dir: str | None = None,
          split: str | None = None, datasets: list[str] | None = None, limit: int | None = None,
          progress: bool = True, backend=None) -> StatsResult:
    """Write `stats.md` (table), `stats.json` (everything, histograms included) and `stats.png`."""
    start = time.perf_counter()
    counter = TokenCounter.from_model_dir(model_dir) if model_dir else TokenCounter.from_preset(preset)
    text_unit = f"tokenizer of {model_dir} (chat template)" if model_dir else "whitespace words"
    source = f"model {model_dir}" if model_dir else f"preset {preset}"
    result = collect(manifest, counter, split, datasets, limit, progress, backend)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(result, source, text_unit)
    table_file = out / "stats.md"
    table_file.write_text(f"# Data stats: {manifest}\n\n{table}\n")
    json_file = write_json(out / "stats.json", {"manifest": str(manifest), "tokens_from": source,
                                                "text_unit": text_unit, "limit": limit,
                                                "datasets": [s.to_dict() for s in result]})
    png = plot(result, out / "stats.png", f"{Path(manifest).name}: text = {text_unit}; media = {source} arithmetic")
    return StatsResult(result, table, table_file, json_file, png, time.perf_counter() - start)


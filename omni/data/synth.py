"""Synthetic omni corpus: a tiny multimodal world a random-init model learns in minutes.

`write_corpus(SynthConfig(out_dir=...))` writes WebDataset shards plus `manifest.yaml`:

    {out_dir}/shards/{task}-{split}-{000000..}.tar      one shard set per task and split
    {out_dir}/manifest.yaml                             urls relative to the manifest's folder

A sample is one `__key__` ("{task}-{split}-{i:06d}") with
    json  {"messages": [user, assistant], "task", "source": "synth", "answer"}
    png | mp4 | wav   one medium of a kind; several of one kind as 0.png, 1.png, ...
    answer.wav        with `voice` set: the answer spoken by espeak-ng (16 kHz mono PCM, silence trimmed), the
                      speech_out stage's target; not an input medium (omni.modalities.SPOKEN_ANSWER)
The k-th `<image>` / `<video>` / `<audio>` placeholder binds to that kind's k-th file.

Tasks (answers are lowercase words from the fixed lists below; every question needs its media):
    image_caption        "<image> Describe the image."            -> "a red circle"
    image_colour         "<image> What colour is the shape?"      -> "red"
    video_colour_change  "<video> What colour does the shape turn into?" -> colour after the change
                         (16 frames at 4 fps; change at 1.2-2.8 s, so at 1 fps t=0 shows A, t=3 B)
    audio_note           "<audio> Which note is played?"          -> "do"
    audio_caption        "<audio> Transcribe the audio."          -> "a do tone"
    image_audio_side     "<image> <audio> A high tone means the top, ..." -> colour there
                         (880 Hz tone = top shape, 220 Hz = bottom shape)
    text_arith           "What is two plus three?"                -> "five"   (no media)

Colour and pitch are the only things to learn: they are learned fast from almost any features,
unlike shape identity or motion direction (docs/decisions.md, "Synthetic corpus").

Splits: train and val come from different seeds (seed*1000 + task_index*10 + split_index), and a
val sample whose parameter tuple (the semantic layout: colours, shapes, sizes, positions, note,
timing) or media bytes equal a train sample's is redrawn. text_arith is the one exception: its
whole question space is 25 (a, b) pairs, so its val questions repeat train ones by construction.
The same config writes byte-identical shards (tar mtime 0, bit-exact mp4 muxing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from omni.modalities import PLACEHOLDERS, SPOKEN_ANSWER
from omni.tiny_world import (
    CHANGE_WINDOW_S,
    COLOUR_RGB,
    COLOURS,
    MEDIA_EXT,
    NOTE_HZ,
    NOTES,
    NUMBERS,
    PROMPTS,
    SAMPLE_RATE,
    SHAPES,
    SIDE_HZ,
    SIDES,
    SPLITS,
    TASK_MEDIA,
    TASKS,
    VIDEO_BIT_RATE,
    VIDEO_FPS,
    VIDEO_FRAMES,
)


# ---------------------------------------------------------------- config and samples
@dataclass
class SynthConfig:
    out_dir: str
    image_size: int = 32
    train_per_task: int = 2000  # samples per task in the train split
    val_per_task: int = 200  # per task in the val split
    samples_per_shard: int = 500
    seed: int = 0
    # Clip length; a tone lasts 0.3-0.8 of it and ends within its first 95 %. An audio encoder that
    # crops clips shorter than this can miss the tone: match it to the encoder's window instead.
    audio_seconds: float = 1.0
    # an espeak-ng voice (e.g. "en", "en-us", "en+f3"): every sample also gets its answer spoken as
    # answer.wav; None: no spoken answers (and no espeak-ng needed). Spoken answers draw nothing from
    # the samples' random streams, so every other member is the same with or without them.
    voice: str | None = None

    def validate(self) -> None:
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"SynthConfig.image_size={self.image_size}: need an even size >= 16 (mp4 frames are even)")
        if self.train_per_task < 1 or self.val_per_task < 0 or self.samples_per_shard < 1:
            raise ValueError(
                f"SynthConfig: need train_per_task >= 1, val_per_task >= 0, samples_per_shard >= 1; got {self}"
            )
        if not 0.1 <= self.audio_seconds <= 30:
            raise ValueError(f"SynthConfig.audio_seconds={self.audio_seconds}: expected 0.1..30 s")


@dataclass(frozen=True)
class Sample:
    key: str
    task: str
    split: str
    prompt: str
    answer: str
    params: tuple  # semantic layout; a val sample never shares one with train (text_arith excepted)
    media: dict  # kind -> list of encoded files, in placeholder order
    spoken: bytes | None = None  # the answer spoken (answer.wav), when the corpus has a voice

    def to_wds(self) -> dict:
        """The sample as a WebDataset dict: json plus media files, all as bytes."""
        for kind, placeholder in PLACEHOLDERS.items():
            n_files, n_slots = len(self.media.get(kind, [])), self.prompt.count(placeholder)
            if n_files != n_slots:
                raise ValueError(f"sample {self.key}: {n_slots} {placeholder} placeholders but {n_files} {kind} files")
        meta = {
            "messages": [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}],
            "task": self.task,
            "source": "synth",
            "answer": self.answer,
        }
        out = {"__key__": self.key, "json": json.dumps(meta).encode("utf-8")}
        for kind, files in self.media.items():
            ext = MEDIA_EXT[kind]
            if len(files) == 1:
                out[ext] = files[0]
            else:
                out.update({f"{i}.{ext}": f for i, f in enumerate(files)})
        if self.spoken is not None:
            out[SPOKEN_ANSWER] = self.spoken
        return out


# ---------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mid/dark gray with mild noise: nothing saturated but the shapes."""
    level = rng.integers(50, 131)
    return np.clip(level + rng.normal(0.0, 5.0, (size, size, 3)), 0, 255)


def _shape_mask(shape: str, size: int, x0: float, y0: float, s: int) -> np.ndarray:
    py, px = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if shape == "square":
        return (px >= x0) & (px <= x0 + s) & (py >= y0) & (py <= y0 + s)
    if shape == "circle":
        return (px - x0 - s / 2) ** 2 + (py - y0 - s / 2) ** 2 <= (s / 2) ** 2
    if shape == "triangle":  # apex up
        return (py >= y0) & (py <= y0 + s) & (np.abs(px - x0 - s / 2) <= (py - y0) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _rgb(rng: np.random.Generator, colour: str) -> np.ndarray:
    return np.clip(np.array(COLOUR_RGB[colour]) + rng.integers(-12, 13, 3), 0, 255)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _mp4(frames: np.ndarray, fps: int = VIDEO_FPS) -> bytes:
    """uint8 (T, H, W, 3) -> mpeg4/yuv420p mp4 bytes, bit-exact (no version or time stamps)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"flags": "+bitexact"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = VIDEO_BIT_RATE
        stream.codec_context.thread_count = 1
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels, dtype=np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _wav(signal: np.ndarray) -> bytes:
    """float signal in [-1, 1] -> 16 kHz mono 16-bit PCM wav bytes."""
    pcm = np.clip(np.round(signal * 32767), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def _spoken(text: str, voice: str) -> bytes:
    """`text` spoken by espeak-ng as wav bytes, without the silence it pads speech with (the talker
    need not learn to say it). Imported here: librosa is only needed for a corpus with a voice."""
    import librosa

    from omni.speech.match import TRIM_DB
    from omni.speech.synth import speak

    words, _ = librosa.effects.trim(speak(text, SAMPLE_RATE, voice), top_db=TRIM_DB)
    return _wav(words)


def _tone(rng: np.random.Generator, hz: float, clip_s: float) -> tuple[tuple, bytes]:
    """One faded sine tone at a random onset, duration and amplitude over light white noise."""
    n = round(clip_s * SAMPLE_RATE)
    dur_ms = int(rng.integers(round(300 * clip_s), round(800 * clip_s) + 1))
    onset_ms = int(rng.integers(0, round(950 * clip_s) - dur_ms + 1))
    amp = int(rng.integers(30, 81))  # percent
    dur, onset = dur_ms * SAMPLE_RATE // 1000, onset_ms * SAMPLE_RATE // 1000
    t = np.arange(dur) / SAMPLE_RATE
    fade = min(dur // 2, SAMPLE_RATE // 100)  # 10 ms raised-cosine fade in and out
    env = np.ones(dur)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    env[:fade] = ramp
    env[dur - fade :] = ramp[::-1]
    signal = rng.normal(0.0, 0.01, n)
    signal[onset : onset + dur] += amp / 100 * env * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    return (hz, onset_ms, dur_ms, amp), _wav(signal)


def _place(rng: np.random.Generator, size: int, lo: float, hi: float) -> tuple[int, int, int]:
    """Random side s in [lo, hi] * size and a top-left corner (x0, y0) keeping the shape inside."""
    s = int(rng.integers(math.ceil(lo * size), math.floor(hi * size) + 1))
    return s, int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))


# ---------------------------------------------------------------- task generators
# Each takes (rng, cfg) and returns (params, prompt, answer, media).
def _one_shape_image(rng, cfg):
    size = cfg.image_size
    colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    s, x0, y0 = _place(rng, size, 0.35, 0.60)
    pixels = _background(rng, size)
    pixels[_shape_mask(shape, size, x0, y0, s)] = _rgb(rng, colour)
    return (colour, shape, s, x0, y0), colour, shape, _png(pixels)


def _gen_image_caption(rng, cfg):
    params, colour, shape, png = _one_shape_image(rng, cfg)
    return params, PROMPTS["image_caption"], f"a {colour} {shape}", {"image": [png]}


def _gen_image_colour(rng, cfg):
    params, colour, _, png = _one_shape_image(rng, cfg)
    return params, PROMPTS["image_colour"], colour, {"image": [png]}


def _gen_video_colour_change(rng, cfg):
    size = cfg.image_size
    a, b = rng.choice(len(COLOURS), 2, replace=False)
    colour_a, colour_b, shape = COLOURS[a], COLOURS[b], SHAPES[rng.integers(len(SHAPES))]
    s, x0, y0 = _place(rng, size, 0.35, 0.60)
    # slight drift: the end position lies within 2 px of the start, still fully inside
    x1 = int(np.clip(x0 + rng.integers(-2, 3), 0, size - s))
    y1 = int(np.clip(y0 + rng.integers(-2, 3), 0, size - s))
    change_s = rng.uniform(*CHANGE_WINDOW_S)
    first_b = math.ceil(change_s * VIDEO_FPS)  # first frame index showing B
    background, rgb_a, rgb_b = _background(rng, size), _rgb(rng, colour_a), _rgb(rng, colour_b)
    frames = np.empty((VIDEO_FRAMES, size, size, 3), np.uint8)
    for i in range(VIDEO_FRAMES):
        f = i / (VIDEO_FRAMES - 1)
        frame = background.copy()
        frame[_shape_mask(shape, size, x0 + f * (x1 - x0), y0 + f * (y1 - y0), s)] = rgb_a if i < first_b else rgb_b
        frames[i] = frame
    params = (colour_a, colour_b, shape, s, x0, y0, x1, y1, first_b)
    return params, PROMPTS["video_colour_change"], colour_b, {"video": [_mp4(frames)]}


def _note_clip(rng, cfg):
    note = NOTES[rng.integers(len(NOTES))]
    params, wav = _tone(rng, NOTE_HZ[note], cfg.audio_seconds)
    return (note, *params), note, wav


def _gen_audio_note(rng, cfg):
    params, note, wav = _note_clip(rng, cfg)
    return params, PROMPTS["audio_note"], note, {"audio": [wav]}


def _gen_audio_caption(rng, cfg):
    params, note, wav = _note_clip(rng, cfg)
    return params, PROMPTS["audio_caption"], f"a {note} tone", {"audio": [wav]}


def _gen_image_audio_side(rng, cfg):
    size, half = cfg.image_size, cfg.image_size // 2
    colours = [COLOURS[i] for i in rng.choice(len(COLOURS), 2, replace=False)]  # top, bottom
    pixels, layout = _background(rng, size), []
    for colour, side in zip(colours, SIDES):
        shape = SHAPES[rng.integers(len(SHAPES))]
        # a 1 px gap either side of the centre line keeps each shape inside its half
        s, x0, _ = _place(rng, size, 0.34, 0.46)
        y0 = int(rng.integers(0, half - s)) if side == "top" else int(rng.integers(half + 1, size - s + 1))
        pixels[_shape_mask(shape, size, x0, y0, s)] = _rgb(rng, colour)
        layout += [colour, shape, s, x0, y0]
    side = SIDES[rng.integers(2)]
    tone_params, wav = _tone(rng, SIDE_HZ[side], cfg.audio_seconds)
    answer = colours[SIDES.index(side)]
    return (*layout, side, *tone_params), PROMPTS["image_audio_side"], answer, {"image": [_png(pixels)], "audio": [wav]}


def _gen_text_arith(rng, cfg):
    a, b = (int(v) for v in rng.integers(0, 5, 2))
    return (a, b), PROMPTS["text_arith"].format(a=NUMBERS[a], b=NUMBERS[b]), NUMBERS[a + b], {}


GENERATORS: dict[str, Callable] = {
    "image_caption": _gen_image_caption,
    "image_colour": _gen_image_colour,
    "video_colour_change": _gen_video_colour_change,
    "audio_note": _gen_audio_note,
    "audio_caption": _gen_audio_caption,
    "image_audio_side": _gen_image_audio_side,
    "text_arith": _gen_text_arith,
}
assert list(GENERATORS) == TASKS
_SHARED_PARAM_SPACE = {"text_arith"}  # too few distinct questions to hold any out


def split_seed(cfg: SynthConfig, task: str, split: str) -> int:
    return cfg.seed * 1000 + TASKS.index(task) * 10 + SPLITS.index(split)


def iter_samples(cfg: SynthConfig, task: str, split: str, exclude: set | None = None) -> Iterator[Sample]:
    """Yield one split's samples in order, redrawing any whose fingerprint is in `exclude`."""
    rng = np.random.default_rng(split_seed(cfg, task, split))
    n = cfg.train_per_task if split == "train" else cfg.val_per_task
    exclude = exclude or set()
    i = redraws = 0
    while i < n:
        params, prompt, answer, media = GENERATORS[task](rng, cfg)
        sample = Sample(f"{task}-{split}-{i:06d}", task, split, prompt, answer, params, media)
        if exclude and any(f in exclude for f in fingerprints(sample)):
            redraws += 1
            if redraws > 10 * n + 100:
                raise RuntimeError(f"synth task {task!r} split {split!r}: too few distinct samples to keep the splits "
                                   "disjoint; raise SynthConfig.image_size or lower train_per_task / val_per_task")
            continue
        yield sample
        i += 1


def fingerprints(sample: Sample) -> list:
    """What must differ between train and val: media sha1 digests and the (task, *params) tuple."""
    prints: list = [hashlib.sha1(f).digest() for files in sample.media.values() for f in files]
    if sample.task not in _SHARED_PARAM_SPACE:
        prints.append((sample.task, *sample.params))
    return prints


def iter_task(cfg: SynthConfig, task: str) -> Iterator[Sample]:
    """All of a task's train samples, then its val samples, none of which repeats a train one."""
    seen: set = set()
    for sample in iter_samples(cfg, task, "train"):
        seen.update(fingerprints(sample))
        yield sample
    yield from iter_samples(cfg, task, "val", exclude=seen)


# ---------------------------------------------------------------- writing
def _shard_pattern(task: str, split: str, n_shards: int) -> str:
    return f"shards/{task}-{split}-{{000000..{n_shards - 1:06d}}}.tar"


def write_corpus(cfg: SynthConfig, progress: bool = True) -> Path:
    """Write every task's train and val shards and the manifest; return the manifest's path."""
    cfg.validate()
    out = Path(cfg.out_dir)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for task in TASKS:  # drop stale shards of an earlier, larger corpus
        for split in SPLITS:
            for old in shard_dir.glob(f"{task}-{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
                old.unlink()

    spoken: dict[str, bytes] = {}  # each distinct answer is rendered once: espeak-ng is deterministic
    total = len(TASKS) * (cfg.train_per_task + cfg.val_per_task)
    bar = tqdm(total=total, unit="sample", desc="synth", disable=not progress)
    entries = []
    for (task, split), samples in itertools.groupby(
        (sample for task in TASKS for sample in iter_task(cfg, task)), key=lambda sample: (sample.task, sample.split)
    ):
        writer = None
        for n, sample in enumerate(samples, 1):
            if (n - 1) % cfg.samples_per_shard == 0:
                if writer:
                    writer.close()
                shard = shard_dir / f"{task}-{split}-{(n - 1) // cfg.samples_per_shard:06d}.tar"
                writer = TarWriter(str(shard), mtime=0.0)
            if cfg.voice is not None:
                if sample.answer not in spoken:
                    spoken[sample.answer] = _spoken(sample.answer, cfg.voice)
                sample = dataclasses.replace(sample, spoken=spoken[sample.answer])
            writer.write(sample.to_wds())
            bar.update()
        writer.close()
        entries.append({
            "name": task,
            "split": split,
            "urls": _shard_pattern(task, split, math.ceil(n / cfg.samples_per_shard)),
            "num_samples": n,
            "weight": 1.0,
            "modalities": list(TASK_MEDIA[task]),
            "task": task,
        })
    bar.close()
    manifest = out / "manifest.yaml"
    spec = {"name": "synth", "datasets": entries}
    manifest.write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None))
    return manifest

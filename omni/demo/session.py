"""What the demo keeps per browser session, with no UI and no model in it (unit-tested alone).

- `FrameWindow`: webcam frames sampled at the model's video fps into a rolling window of at most
  `max_frames` (the model's cap), so a turn's `<video>` is "the last N seconds of camera".
- `Listener`: microphone chunks -> utterances. `mode="vad"` ends an utterance by a simple energy
  voice-activity detector (speech = frames louder than the noise floor by a margin, end = enough
  trailing silence); `mode="ptt"` (push-to-talk) ends it when the user stops recording.
- `load_upload`: an uploaded file -> (modality, value the processor takes) or a `MediaError`
  whose message is shown in the UI as is; `model_audio` turns a recording into the 16 kHz mono
  waveform the processor takes. Both apply the model's media policy (omni/model/media_policy.py:
  long audio cut, silence refused, long video spread), the one `omni chat` and `omni eval` get.
- `Conversation`: the turns of a chat with their media, in the form the generator takes
  (placeholders added the way `omni chat` adds them). What it holds is bounded: uploaded images
  and videos stay files (opened for each turn), camera frames are shrunk to the tower's size on
  arrival (`shrink`), and `nbytes` counts the rest for the demo's per-session budget.
"""
from __future__ import annotations

import io
import math
import struct
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from encoders import dbfs, load_audio
from omni.inference import with_placeholders
from omni.model.media_policy import MediaPolicy, MediaRefused

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
VIDEO_EXT = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"}
AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac"}


class MediaError(ValueError):
    """An input the demo refuses; the message is meant for the user, as is."""


def shrink(frame: Image.Image, side: int) -> Image.Image:
    """`frame` with its short side brought down to `side` (the image tower's input size), keeping
    the aspect ratio; smaller frames unchanged. A 1080p webcam frame is 6 MB; the tower reads 384 px."""
    w, h = frame.size
    if min(w, h) <= side:
        return frame
    scale = side / min(w, h)
    return frame.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------- webcam frames
class FrameWindow:
    """The last `max_frames` webcam frames, one per 1/fps seconds of stream time.

    `offer` keeps a frame only when at least 1/fps has passed since the last kept one, so a
    browser sending frames faster than the model's rate is sampled down; older frames fall out.
    """

    def __init__(self, fps: float, max_frames: int, stale_s: float = 3.0):
        if fps <= 0 or max_frames < 1:
            raise ValueError(f"FrameWindow: need fps > 0 and max_frames >= 1, got {fps}, {max_frames}")
        self.period = 1.0 / fps
        self.max_frames = max_frames
        self.stale_s = stale_s  # a window whose newest frame is older than this is not "live"
        self._frames: deque[tuple[float, Image.Image]] = deque(maxlen=max_frames)
        self.seen = 0      # frames offered
        self.kept = 0      # frames that entered the window
        self.dropped = 0   # kept frames pushed out by newer ones

    def due(self, t: float) -> bool:
        """Whether a frame arriving at `t` would be kept (1/fps after the last kept one)."""
        # 1 % slack absorbs timer jitter (frames sent every 0.5 s arrive at 0.499 / 0.502 s ...)
        return not self._frames or t - self._frames[-1][0] >= self.period * 0.99

    def offer(self, frame: Image.Image, t: float) -> bool:
        self.seen += 1
        if not self.due(t):
            return False
        if len(self._frames) == self.max_frames:
            self.dropped += 1
        self._frames.append((t, frame))
        self.kept += 1
        return True

    def live(self, now: float) -> bool:
        return bool(self._frames) and now - self._frames[-1][0] <= self.stale_s

    def snapshot(self, now: float) -> list[Image.Image]:
        """The window's frames in time order, or [] when the camera stopped sending."""
        return [f for _, f in self._frames] if self.live(now) else []

    def span_s(self) -> float:
        return self._frames[-1][0] - self._frames[0][0] if len(self._frames) > 1 else 0.0

    def __len__(self) -> int:
        return len(self._frames)

    def clear(self) -> None:
        self._frames.clear()


def contact_sheet(frames: list[Image.Image], height: int = 96) -> Image.Image:
    """Frames side by side (what a turn's `<video>` showed the model), for the chat."""
    thumbs = [f.convert("RGB").resize((max(1, round(f.width * height / f.height)), height)) for f in frames]
    sheet = Image.new("RGB", (sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1), height), (255, 255, 255))
    x = 0
    for t in thumbs:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    return sheet


# ------------------------------------------------------------------------- microphone
def decode_wav_chunk(data: bytes) -> tuple[int, np.ndarray]:
    """A streamed WAV chunk -> (sample rate, float32 mono in [-1, 1]).

    The browser sends each chunk as the recording's 44-byte header followed by new samples, so
    the header's sizes describe the first chunk, not this one: read the format fields from the
    header and take every byte after the `data` tag as samples.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MediaError("microphone chunk is not WAV data")
    pos, fmt, sr, channels, bits = 12, None, 0, 0, 0
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if tag == b"fmt ":
            fmt, channels, sr, _, _, bits = struct.unpack("<HHIIHH", data[pos + 8:pos + 24])
        elif tag == b"data":
            pos += 8
            break
        pos += 8 + size + (size & 1)
    else:
        raise MediaError("microphone chunk has no data section")
    if fmt is None or channels < 1 or sr <= 0:
        raise MediaError("microphone chunk has no usable fmt section")
    payload = data[pos:]
    if fmt == 1 and bits == 16:
        pcm = np.frombuffer(payload[: len(payload) // 2 * 2], "<i2").astype(np.float32) / 32768.0
    elif fmt == 3 and bits == 32:
        pcm = np.frombuffer(payload[: len(payload) // 4 * 4], "<f4").astype(np.float32)
    elif fmt == 1 and bits == 32:
        pcm = np.frombuffer(payload[: len(payload) // 4 * 4], "<i4").astype(np.float32) / 2.0**31
    else:
        raise MediaError(f"microphone chunk: unsupported WAV format {fmt} with {bits}-bit samples")
    pcm = pcm[: pcm.size // channels * channels].reshape(-1, channels).mean(axis=1)
    return sr, np.ascontiguousarray(pcm, dtype=np.float32)


@dataclass
class Utterance:
    samples: np.ndarray   # float32 mono at `sr`
    sr: int
    speech_s: float       # seconds of voiced frames in it
    end_s: float          # stream time (s since recording started) where the last voiced frame ended
    detected_s: float     # stream time at which the utterance was closed
    reason: str           # "silence after speech" | "push-to-talk stop" | "max length"


@dataclass
class VADConfig:
    frame_ms: int = 20
    abs_threshold_db: float = -45.0   # never call anything quieter than this speech
    margin_db: float = 12.0           # speech must be this much louder than the noise floor
    calibrate_ms: int = 300           # the quietest of a recording's first frames sets the floor
    floor_rise_db_s: float = 2.0      # the floor follows louder noise this slowly (falls at once)
    min_speech_ms: int = 120          # voiced run that opens an utterance
    end_silence_ms: int = 600         # trailing silence that closes it
    pre_roll_ms: int = 200            # audio kept from before the utterance opened
    tail_ms: int = 100                # silence kept after the last voiced frame
    max_utterance_s: float = 60.0     # hard cap of what is buffered (the model's window cuts later)


class Listener:
    """Microphone chunks in, whole utterances out.

    VAD: a 20 ms frame is voiced when louder than both an absolute threshold and the noise floor
    plus a margin. The floor starts as the quietest of the first 300 ms (so speech that starts
    the instant recording does is missed until the next pause), then falls to any quieter frame
    at once and rises 2 dB/s, so steady noise stops counting as speech. Push-to-talk only uses the
    absolute threshold, to tell a recording from silence.

    `feed(chunk, sr)` returns an `Utterance` when one ends (VAD mode) and None otherwise;
    `finish()` closes the recording (the user pressed stop): in push-to-talk mode it returns the
    whole recording if any of it was voiced, in VAD mode an utterance still open; when it returns
    None, `only_silence` says whether nothing voiced was heard since the last utterance.
    """

    def __init__(self, mode: str = "vad", cfg: VADConfig | None = None):
        if mode not in ("vad", "ptt"):
            raise ValueError(f"Listener: mode must be 'vad' or 'ptt', got {mode!r}")
        self.mode, self.cfg = mode, cfg or VADConfig()
        self.reset()

    def reset(self) -> None:
        self.sr = 0
        self.t = 0.0                   # stream time of the next sample
        self.noise_db = -90.0          # running noise-floor estimate
        self._calibration: list[float] = []
        self.level_db = -math.inf      # level of the latest frame (for the UI meter)
        self._pending = np.zeros(0, np.float32)   # samples not yet framed
        self._pre: deque[np.ndarray] = deque()    # pre-roll frames (VAD, outside an utterance)
        self._buf: list[np.ndarray] = []          # frames of the open utterance / PTT recording
        self._run = 0                  # consecutive voiced frames before an utterance opens
        self._silent = 0               # consecutive unvoiced frames inside an utterance
        self._voiced = 0               # voiced frames in the open utterance
        self._last_voiced_end = 0.0
        self.open = False
        self.heard_speech = False      # any voiced frame since the last utterance / reset
        self.only_silence = False      # set by finish()

    @property
    def recorded_s(self) -> float:  # every buffered frame has frame_ms of samples
        return len(self._buf) * self.cfg.frame_ms / 1000

    def recording(self) -> tuple[np.ndarray, bool] | None:
        """(samples, final) of the utterance (VAD) or recording (push-to-talk) still open, from its
        start: what its `Utterance` will begin with; None when none is open. `final`: in VAD mode,
        once a pause has lasted `tail_ms`, the samples are those the utterance will have if this
        pause ends it (what closing keeps), so they can be prepared while the VAD waits."""
        if not (self.open or (self.mode == "ptt" and self._buf)):
            return None
        tail = max(0, self.cfg.tail_ms // self.cfg.frame_ms)
        final = self.mode == "vad" and self._silent >= tail
        frames = self._buf[: len(self._buf) - self._silent + tail] if final else self._buf
        return (np.concatenate(frames) if frames else np.zeros(0, np.float32)), final

    def threshold_db(self) -> float:
        return max(self.cfg.abs_threshold_db, self.noise_db + self.cfg.margin_db)

    def feed(self, chunk: np.ndarray, sr: int) -> Utterance | None:
        if self.sr and sr != self.sr:
            raise MediaError(f"microphone sample rate changed from {self.sr} to {sr} Hz mid-recording")
        self.sr = sr
        n = max(1, sr * self.cfg.frame_ms // 1000)
        data = np.concatenate([self._pending, np.asarray(chunk, np.float32)])
        whole = data.size // n * n
        self._pending = data[whole:]
        done = None
        for frame in data[:whole].reshape(-1, n):
            u = self._frame(frame)
            done = done or u
        return done

    def _frame(self, frame: np.ndarray) -> Utterance | None:
        cfg, dt = self.cfg, frame.size / self.sr
        self.level_db = level = dbfs(frame)
        floor = max(level, -90.0)
        self.t += dt
        if self.mode == "ptt":  # the user marks the speech; only silence is refused
            voiced = level > cfg.abs_threshold_db
        elif self.t <= cfg.calibrate_ms / 1000 + 1e-9:  # calibrating: never speech
            self._calibration.append(floor)
            self.noise_db = min(self._calibration)
            voiced = False
        else:  # falls to quieter frames at once, rises slowly, so loud steady noise stops being speech
            voiced = level > self.threshold_db()
            self.noise_db = floor if floor < self.noise_db else min(floor, self.noise_db + cfg.floor_rise_db_s * dt)
        if voiced:
            self.heard_speech = True
            self._last_voiced_end = self.t
        if self.mode == "ptt":
            self._buf.append(frame)
            self._voiced += voiced
            if self.recorded_s >= cfg.max_utterance_s:
                return self._close("max length")
            return None
        if not self.open:
            self._pre.append(frame)
            pre_frames = max(1, cfg.pre_roll_ms // cfg.frame_ms) + cfg.min_speech_ms // cfg.frame_ms
            while len(self._pre) > pre_frames:
                self._pre.popleft()
            self._run = self._run + 1 if voiced else 0
            if self._run * cfg.frame_ms >= cfg.min_speech_ms:
                self.open, self._buf, self._voiced, self._silent = True, list(self._pre), self._run, 0
                self._pre.clear()
            return None
        self._buf.append(frame)
        if voiced:
            self._voiced += 1
            self._silent = 0
        else:
            self._silent += 1
        if self._silent * cfg.frame_ms >= cfg.end_silence_ms:
            keep = len(self._buf) - self._silent + max(0, cfg.tail_ms // cfg.frame_ms)
            self._buf = self._buf[:keep]
            return self._close("silence after speech")
        if self.recorded_s >= cfg.max_utterance_s:
            return self._close("max length")
        return None

    def _close(self, reason: str) -> Utterance | None:
        frames, voiced = self._buf, self._voiced
        self._buf, self._voiced, self._silent, self._run, self.open = [], 0, 0, 0, False
        self._pre.clear()
        self.heard_speech = False
        if not frames or not voiced:
            return None
        n = frames[0].size
        return Utterance(np.concatenate(frames), self.sr, voiced * n / self.sr, self._last_voiced_end,
                         self.t, reason)

    def finish(self) -> Utterance | None:
        """The user stopped recording: close what is open (VAD) or the whole recording (PTT).
        None: nothing to send; `only_silence` then says whether nothing voiced was heard at all
        since the last utterance (the UI says so) rather than an utterance having been sent."""
        self.only_silence = not self.heard_speech
        u = self._close("push-to-talk stop" if self.mode == "ptt" else "recording stopped") \
            if self.mode == "ptt" or self.open else None
        self._pre.clear()
        self._pending = np.zeros(0, np.float32)
        self.heard_speech = False
        return u


def wav_bytes(samples: np.ndarray, sr: int) -> bytes:
    """float32 mono -> 16-bit PCM WAV bytes (how recordings are kept and shown)."""
    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32767), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def model_audio(samples: np.ndarray, sr: int, policy: MediaPolicy) -> tuple[np.ndarray, list[str]]:
    """A recording -> the 16 kHz mono waveform the processor takes, after the media policy.

    Resampling goes through a WAV file and `encoders.load_audio`, the decoder every other audio
    input takes, so a recording and the same sound uploaded as a file reach the model alike.
    Raises MediaError for silence; returns notes for the user (e.g. that it was cut).
    """
    silence = MediaError("heard only silence: nothing was sent (speak louder or check the microphone)")
    if samples.size == 0:
        raise silence
    try:
        return policy.audio(load_audio(wav_bytes(samples, sr)), "recording")
    except MediaRefused:
        raise silence from None


# ------------------------------------------------------------------------- uploads
def _kind_by_content(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im.verify()
        return "image"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass
    import av

    try:
        with av.open(str(path)) as container:
            if container.streams.video:
                return "video"
            if container.streams.audio:
                return "audio"
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        pass
    return None


def media_kind(path: str | Path) -> str:
    """"image" / "video" / "audio" by file suffix, else by content; MediaError otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    for kind, exts in (("image", IMAGE_EXT), ("video", VIDEO_EXT), ("audio", AUDIO_EXT)):
        if suffix in exts:
            return kind
    kind = _kind_by_content(path)
    if kind is None:
        raise MediaError(f"{path.name} is not an image, video or audio file (accepted: "
                         f"{', '.join(sorted(IMAGE_EXT | VIDEO_EXT | AUDIO_EXT))})")
    return kind


@dataclass
class MediaItem:
    kind: str            # "image" | "video" | "audio"
    value: object        # image: its file (opened per turn) or a PIL image; video: its file or a list of
                         # PIL frames; audio: float32 16 kHz waveform
    path: str            # the file shown in the chat
    notes: list[str] = field(default_factory=list)
    frames: list = field(default_factory=list)  # an uploaded video's frames, for its strip in the chat only


def load_upload(path: str | Path, policy: MediaPolicy) -> MediaItem:
    """Check an uploaded file the way the processor will read it, or raise MediaError saying why not.

    Images are decoded once to check them and kept as their file; videos as their file, with the
    frames the processor will sample (`frames`, for the chat's strip); audio as the 16 kHz
    waveform of `load_audio`. The media policy applies (audio cut or refused as silent, a long
    video's frames spread) and its notes come with the item.
    """
    path = Path(path)
    kind = media_kind(path)
    if kind == "image":
        try:
            with Image.open(path) as im:
                im.load()  # decodes every pixel: a truncated file fails here, not mid-turn
            return MediaItem("image", str(path), str(path))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{path.name}: cannot read this image ({_short(e, path)})") from None
    if kind == "video":
        try:
            frames, notes = policy.frames(str(path), path.name)
        except MediaRefused as e:
            raise MediaError(f"{path.name}: cannot read this video ({_short(e, path)})") from None
        return MediaItem("video", str(path), str(path), notes, frames)
    try:
        wav = load_audio(str(path))
    except ValueError as e:
        raise MediaError(f"{path.name}: cannot read this audio ({_short(e, path)})") from None
    try:
        wav, notes = policy.audio(wav, path.name)
    except MediaRefused as e:
        raise MediaError(str(e)) from None
    return MediaItem("audio", wav, str(path), notes)


def _short(e: Exception, path: Path, limit: int = 160) -> str:
    """First line of a decoder's error, without the server-side upload folder."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = text.replace(str(path), path.name).replace(repr(str(path)), repr(path.name))
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------- conversation
@dataclass(eq=False)
class Turn:
    text: str                                  # the user's text with placeholders (model side)
    media: dict[str, list]                     # this turn's media by modality, in order
    answer: str = ""


class Conversation:
    """Turns in order; the k-th placeholder of a kind binds to that kind's k-th medium."""

    def __init__(self):
        self.turns: list[Turn] = []

    def add_user(self, text: str, items: list[MediaItem]) -> Turn:
        media: dict[str, list] = {}
        for item in items:
            media.setdefault(item.kind, []).append(item.value)
        turn = Turn(with_placeholders(text, {k: len(v) for k, v in media.items()}), media)
        self.turns.append(turn)
        return turn

    def messages(self) -> list[dict]:
        out = []
        for turn in self.turns:
            out.append({"role": "user", "content": turn.text})
            if turn.answer:
                out.append({"role": "assistant", "content": turn.answer})
        return out

    def media(self) -> dict[str, list]:
        """Every turn's media in the form the processor takes; image files are opened here (lazily:
        decoded by the processor, freed after the turn)."""
        out: dict[str, list] = {}
        for turn in self.turns:
            for kind, values in turn.media.items():
                out.setdefault(kind, []).extend(Image.open(v) if kind == "image" and isinstance(v, str) else v
                                                for v in values)
        return out

    def nbytes(self) -> int:
        """Bytes of media held in memory (waveforms, frames; files on disk count nothing)."""
        return sum(_nbytes(v) for turn in self.turns for values in turn.media.values() for v in values)

    def drop_oldest(self) -> bool:
        """Forget the oldest turn (to fit the context); False when only the current one is left."""
        if len(self.turns) <= 1:
            return False
        self.turns.pop(0)
        return True

    def __len__(self) -> int:
        return len(self.turns)


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, list):
        return sum(_nbytes(v) for v in value)
    return 0

"""What the demo keeps per browser session, with no UI and no model in it (unit-tested alone).

- `FrameWindow`: webcam frames sampled at the model's video fps into a rolling window of at most
  `max_frames` (the model's cap), so a turn's `<video>` is "the last N seconds of camera".
- `Listener`: microphone chunks -> utterances. `mode="vad"` ends an utterance by a simple energy
  voice-activity detector (speech = frames louder than the noise floor by a margin, end = enough
  trailing silence); `mode="ptt"` (push-to-talk) ends it when the user stops recording.
- `load_upload`: an uploaded file -> (modality, value the processor takes) or a `MediaError`
  whose message is shown in the UI as is; `model_audio` turns a recording into the 16 kHz mono
  waveform the processor takes, cut to the model's audio window.
- `Conversation`: the turns of a chat with their media, in the form `stream_answer` takes
  (placeholders added the way `omni chat` adds them).
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

from encoders import SAMPLE_RATE, VideoSamplingConfig, load_audio, read_video_frames
from omni.inference import with_placeholders

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
VIDEO_EXT = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"}
AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac"}
SILENCE_DBFS = -55.0  # a recording or file whose loudest 20 ms stays below this is "silence"


class MediaError(ValueError):
    """An input the demo refuses; the message is meant for the user, as is."""


def dbfs(samples: np.ndarray) -> float:
    """RMS level of float samples in [-1, 1], in dB relative to full scale (-inf for zeros)."""
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def peak_frame_dbfs(samples: np.ndarray, sr: int, frame_ms: int = 20) -> float:
    """Level of the loudest `frame_ms` frame: what decides "silent" for a file or a recording."""
    n = max(1, sr * frame_ms // 1000)
    usable = samples[: samples.size // n * n].reshape(-1, n) if samples.size >= n else samples[None]
    return max(dbfs(f) for f in usable)


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


def model_audio(samples: np.ndarray, sr: int, max_samples: int) -> tuple[np.ndarray, list[str]]:
    """A recording -> the 16 kHz mono waveform the processor takes, cut to `max_samples`.

    Resampling goes through a WAV file and `encoders.load_audio`, the decoder every other audio
    input takes, so a recording and the same sound uploaded as a file reach the model alike.
    Raises MediaError for silence; returns notes for the user (e.g. that it was cut).
    """
    if samples.size == 0 or peak_frame_dbfs(samples, sr) < SILENCE_DBFS:
        raise MediaError("heard only silence: nothing was sent (speak louder or check the microphone)")
    return _cut(load_audio(wav_bytes(samples, sr)), max_samples, "recording")


def _cut(wav: np.ndarray, max_samples: int, what: str) -> tuple[np.ndarray, list[str]]:
    if wav.size <= max_samples:
        return wav, []
    note = (f"{what} is {wav.size / SAMPLE_RATE:.1f} s: cut to its first {max_samples / SAMPLE_RATE:.1f} s "
            "(the model's audio window)")
    return wav[:max_samples], [note]


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
    value: object        # PIL image | list of PIL frames | float32 16 kHz waveform
    path: str            # the file shown in the chat
    notes: list[str] = field(default_factory=list)


def load_upload(path: str | Path, video: VideoSamplingConfig, max_audio_samples: int) -> MediaItem:
    """Decode an uploaded file the way the processor would, or raise MediaError saying why not.

    Images become RGB PIL images; videos the frames `read_video_frames` samples (the processor
    would decode the same ones from the path); audio the 16 kHz waveform of `load_audio`, cut to
    `max_audio_samples`. Silent audio and unreadable files are refused.
    """
    path = Path(path)
    kind = media_kind(path)
    if kind == "image":
        try:
            with Image.open(path) as im:
                return MediaItem("image", im.convert("RGB"), str(path))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{path.name}: cannot read this image ({_short(e, path)})") from None
    if kind == "video":
        import decord

        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            n, native_fps = len(reader), float(reader.get_avg_fps())
            del reader
            frames = read_video_frames(str(path), video)
        except (ValueError, RuntimeError, decord.DECORDError) as e:
            raise MediaError(f"{path.name}: cannot read this video ({_short(e, path)})") from None
        notes = []
        if native_fps > 0 and math.ceil(n / native_fps * video.fps - 1e-6) > video.max_frames:
            notes.append(f"{path.name} is {n / native_fps:.1f} s: the model takes at most {video.max_frames} "
                         f"frames, so {len(frames)} were spread evenly over it instead of {video.fps:g} per second")
        return MediaItem("video", frames, str(path), notes)
    try:
        wav = load_audio(str(path))
    except ValueError as e:
        raise MediaError(f"{path.name}: cannot read this audio ({_short(e, path)})") from None
    if peak_frame_dbfs(wav, SAMPLE_RATE) < SILENCE_DBFS:
        raise MediaError(f"{path.name} is silent: there is nothing to hear in it")
    wav, notes = _cut(wav, max_audio_samples, path.name)
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
        out: dict[str, list] = {}
        for turn in self.turns:
            for kind, values in turn.media.items():
                out.setdefault(kind, []).extend(values)
        return out

    def drop_oldest(self) -> bool:
        """Forget the oldest turn (to fit the context); False when only the current one is left."""
        if len(self.turns) <= 1:
            return False
        self.turns.pop(0)
        return True

    def __len__(self) -> int:
        return len(self.turns)

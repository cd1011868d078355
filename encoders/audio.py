"""Audio tower: whisper's encoder (openai-whisper's own module), plus decoding and windowing.

Whisper's encoder takes fixed windows (30 s for large-v3) of log-mel frames at 100 frames/s
and emits 50 frames/s; long audio is split into consecutive windows, and ``valid_frames``
tells the caller how many output frames of a padded window carry real audio.
Decoding uses PyAV because ``whisper.load_audio`` shells out to an ffmpeg binary.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass

import av
import numpy as np
import torch
import whisper
import whisper.audio
import whisper.model
from torch import nn
from torch.utils.checkpoint import checkpoint

SAMPLE_RATE = whisper.audio.SAMPLE_RATE  # 16000
HOP = whisper.audio.HOP_LENGTH  # 160 samples = 10 ms per mel frame

# our config field -> whisper ModelDimensions field
_DIMS = {
    "n_mels": "n_mels",
    "n_ctx": "n_audio_ctx",
    "n_state": "n_audio_state",
    "n_head": "n_audio_head",
    "n_layer": "n_audio_layer",
}


@dataclass
class AudioTowerConfig:
    """Whisper encoder dims (defaults: large-v3) and an optional checkpoint to load."""

    n_mels: int = 128
    n_ctx: int = 1500  # encoder output frames per window (2 * n_ctx mel frames in)
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 32
    checkpoint: str | None = None  # .pt saved by openai-whisper, or a whisper model name ("large-v3")
    max_windows: int = 8  # the most windows of one clip the model reads; the processor cuts the rest

    def __post_init__(self) -> None:
        for name in _DIMS:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AudioTowerConfig: {name} must be a positive int, got {value!r}")
        if isinstance(self.max_windows, bool) or not isinstance(self.max_windows, int) or self.max_windows < 1:
            raise ValueError(f"AudioTowerConfig: max_windows must be an int >= 1, got {self.max_windows!r}")
        if self.n_mels not in (80, 128):
            raise ValueError(
                f"AudioTowerConfig: n_mels must be 80 or 128 (whisper ships only those mel filters), got {self.n_mels}"
            )
        if self.n_state % self.n_head:
            raise ValueError(f"AudioTowerConfig: n_state {self.n_state} must be divisible by n_head {self.n_head}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise ValueError(
                f"AudioTowerConfig: checkpoint must be a path or whisper model name, got {self.checkpoint!r}"
            )


def _resolve_checkpoint(checkpoint: str) -> str:
    """A local .pt path as is, or a whisper model name downloaded by whisper's own mechanism."""
    if os.path.isfile(checkpoint):
        return checkpoint
    if checkpoint in whisper._MODELS:
        root = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper")
        return whisper._download(whisper._MODELS[checkpoint], root, in_memory=False)
    raise ValueError(
        f"AudioTowerConfig.checkpoint {checkpoint!r} is neither a file nor a whisper model name "
        f"({whisper.available_models()})"
    )


def _load_encoder_state(cfg: AudioTowerConfig) -> dict[str, torch.Tensor]:
    path = _resolve_checkpoint(cfg.checkpoint)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(
            f"whisper checkpoint {path}: expected a dict with 'dims' and 'model_state_dict' (openai-whisper format)"
        )
    ours = asdict(cfg)
    wrong = {k: (ours[k], ckpt["dims"].get(w)) for k, w in _DIMS.items() if ckpt["dims"].get(w) != ours[k]}
    if wrong:
        detail = ", ".join(f"{k}: config {a} vs checkpoint {b}" for k, (a, b) in wrong.items())
        raise ValueError(f"whisper checkpoint {path} does not match AudioTowerConfig ({detail}); fix the config dims")
    return {k.removeprefix("encoder."): v for k, v in ckpt["model_state_dict"].items() if k.startswith("encoder.")}


class AudioEncoder(nn.Module):
    """Wraps ``whisper.model.AudioEncoder``: log-mel windows [N, n_mels, 2*n_ctx] -> [N, n_ctx, n_state].

    Parameters live under ``encoder.``, the same names as in whisper checkpoints.
    """

    def __init__(self, cfg: AudioTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = whisper.model.AudioEncoder(cfg.n_mels, cfg.n_ctx, cfg.n_state, cfg.n_head, cfg.n_layer)
        if cfg.checkpoint is not None:
            if torch.get_default_device().type == "meta":
                raise ValueError(
                    f"AudioEncoder: cannot load checkpoint {cfg.checkpoint!r} on the meta device; build on a real "
                    "device (or build with checkpoint=None on meta and load weights after materialising)"
                )
            self.encoder.load_state_dict(_load_encoder_state(cfg), strict=True)
        self.out_dim = cfg.n_state
        self.window_samples = cfg.n_ctx * 2 * HOP  # 480000 = 30 s for large-v3

    def log_mel(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One window: zero-pad or trim to ``window_samples``, then whisper's log-mel -> [n_mels, 2*n_ctx]."""
        audio = torch.as_tensor(waveform, dtype=torch.float32)
        if audio.ndim != 1:
            raise ValueError(f"AudioEncoder.log_mel: expected a mono 1-D waveform, got shape {tuple(audio.shape)}")
        audio = whisper.pad_or_trim(audio, self.window_samples)
        return whisper.log_mel_spectrogram(audio, n_mels=self.cfg.n_mels)

    def valid_frames(self, num_samples: int) -> int:
        """Output frames of one window that carry real audio: ceil(min(n, window) / (2*HOP)), >= 1."""
        if num_samples < 0:
            raise ValueError(f"AudioEncoder.valid_frames: num_samples must be >= 0, got {num_samples}")
        return max(1, math.ceil(min(num_samples, self.window_samples) / (2 * HOP)))

    def split_windows(self, waveform: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Consecutive ``window_samples`` chunks of a 1-D waveform; the last may be shorter."""
        audio = np.asarray(waveform, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"AudioEncoder.split_windows: expected a non-empty 1-D waveform, got shape {audio.shape}")
        return [audio[i : i + self.window_samples] for i in range(0, audio.size, self.window_samples)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in backward (as open_clip's
        `set_grad_checkpointing` does for the image tower). Whisper has no switch of its own: the
        blocks become `_CheckpointedBlock`, the same module with the same parameter names."""
        for block in self.encoder.blocks:
            block.__class__ = _CheckpointedBlock if enable else whisper.model.ResidualAttentionBlock

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        expected = (self.cfg.n_mels, 2 * self.cfg.n_ctx)
        if mel.ndim != 3 or tuple(mel.shape[1:]) != expected:
            raise ValueError(f"AudioEncoder: expected mel [N, {expected[0]}, {expected[1]}], got {tuple(mel.shape)}")
        return self.encoder(mel)


class _CheckpointedBlock(whisper.model.ResidualAttentionBlock):
    """whisper's residual block run under activation checkpointing while gradients are recorded."""

    def forward(self, x, *args, **kwargs):
        if torch.is_grad_enabled() and self.training:
            return checkpoint(super().forward, x, *args, use_reentrant=False, **kwargs)
        return super().forward(x, *args, **kwargs)


def dbfs(samples: np.ndarray) -> float:
    """RMS level of float samples in [-1, 1], in dB relative to full scale (-inf for zeros)."""
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def loudest_frame_dbfs(samples: np.ndarray, sr: int = SAMPLE_RATE, frame_ms: int = 20) -> float:
    """Level of the loudest `frame_ms` frame: what tells a clip with sound from silence (a short
    sound in a long quiet file still counts; one loud click does not need to be long)."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    n = max(1, sr * frame_ms // 1000)
    if samples.size < n:
        return dbfs(samples)
    frames = samples[: samples.size // n * n].reshape(-1, n).astype(np.float64)
    return dbfs(frames[int(np.argmax(np.mean(np.square(frames), axis=1)))])


def _describe(source: bytes | str | os.PathLike) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else repr(os.fspath(source))


def load_audio(source: bytes | str | os.PathLike) -> np.ndarray:
    """Decode any audio file PyAV/ffmpeg reads (wav, flac, mp3, ...) to mono float32 at 16 kHz.

    Mirrors ``whisper.load_audio`` (``ffmpeg -ac 1 -ar 16000 -f s16le``, then / 32768) with
    ffmpeg's resampler on the first audio stream. Resampling to s16 matters: for integer output
    ffmpeg down-mixes stereo as (L + R) / 2, for float output as (L + R) / sqrt(2), which is
    louder than whisper's training audio and can exceed [-1, 1].
    Raises ValueError naming the source on failure.
    """
    name = _describe(source)
    chunks: list[np.ndarray] = []
    try:
        file = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        with av.open(file, mode="r") as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ValueError(f"load_audio: cannot decode audio {name}: {e}") from e
    if not chunks or sum(c.size for c in chunks) == 0:
        raise ValueError(f"load_audio: audio {name} decoded to zero samples")
    return np.concatenate(chunks).astype(np.float32) / 32768.0

"""The tiny codec's decoding half: its config, its codebooks and codes -> wave (the sum of each
codebook's entry is a log-mel frame; the mel filterbank is inverted and Griffin-Lim finds a phase,
both by librosa). numpy, torch and librosa only, so `omni export` ships this file as remote code and
an export speaks without omni; `TinyCodec` (tiny_codec.py) adds fitting, encoding and its files."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

CONFIG_FILE, CODEBOOKS_FILE = "tiny_codec.json", "tiny_codec.safetensors"  # beside a model's weights
GRIFFIN_LIM_SEED = 0  # Griffin-Lim's random initial phase, fixed: the same codes give the same wave anywhere


@dataclasses.dataclass(frozen=True)
class TinyCodecConfig:
    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 256  # 62.5 frames a second at 16 kHz
    n_mels: int = 80
    codebooks: int = 4
    codebook_size: int = 64
    griffin_lim_iters: int = 32

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "codebooks", "codebook_size", "griffin_lim_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TinyCodecConfig.{name} must be positive, got {getattr(self, name)}")


class TinyCodebooks:
    """Residual-VQ log-mel codebooks [codebooks, codebook_size, n_mels] and their decoder."""

    def __init__(self, config: TinyCodecConfig, centroids: np.ndarray):
        want = (config.codebooks, config.codebook_size, config.n_mels)
        if centroids.shape != want:
            raise ValueError(f"TinyCodec: centroids have shape {centroids.shape}, the config needs {want}")
        self.config = config
        self.centroids = centroids.astype(np.float32)
        self.sample_rate = config.sample_rate
        self.frame_rate = config.sample_rate / config.hop_length
        self.codebooks = config.codebooks
        self.codebook_size = config.codebook_size

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """int64 codes [codebooks, frames] -> float32 wave at `sample_rate`."""
        try:  # librosa is needed to speak only: a consumer of a text-only export goes without it
            from librosa import griffinlim
            from librosa.feature.inverse import mel_to_stft
        except ImportError:
            raise ImportError("decoding the tiny codec needs librosa: pip install librosa") from None
        if codes.ndim != 2 or codes.shape[0] != self.codebooks:
            raise ValueError(f"TinyCodec.decode: codes must be [{self.codebooks}, frames], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"TinyCodec.decode: codes must lie in [0, {self.codebook_size}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        idx = codes.cpu().numpy()
        log_mel = sum(book[i] for book, i in zip(self.centroids, idx))  # [frames, n_mels]
        c = self.config
        stft = mel_to_stft(np.exp(log_mel).T, sr=c.sample_rate, n_fft=c.n_fft, power=2.0)  # librosa's mel_to_audio,
        wave = griffinlim(stft, n_iter=c.griffin_lim_iters, hop_length=c.hop_length, n_fft=c.n_fft,  # seeded
                          random_state=GRIFFIN_LIM_SEED)
        return wave.astype(np.float32)

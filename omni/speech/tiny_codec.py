"""A codec that needs no pretrained weights and still makes real audio: log-mel frames quantised by
residual k-means codebooks fitted on the corpus (coarse to fine, like a neural codec's residual VQ),
decoded by inverting the mel filterbank and Griffin-Lim (librosa). For the tiny world and its tests."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import librosa
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances_argmin

from omni.config import from_dict

LOG_FLOOR = 1e-5  # mel power below this is silence; keeps log finite


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


class TinyCodec:
    """Residual-VQ log-mel codec; `fit` learns its codebooks, `save`/`load` keep them."""

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

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """[frames, n_mels] log mel power: the frames the codebooks quantise."""
        c = self.config
        mel = librosa.feature.melspectrogram(y=wave, sr=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length,
                                             n_mels=c.n_mels, power=2.0)
        return np.log(np.maximum(mel, LOG_FLOOR)).T.astype(np.float32)

    @classmethod
    def fit(cls, waves: list[np.ndarray], config: TinyCodecConfig = TinyCodecConfig(), seed: int = 0) -> "TinyCodec":
        """Codebooks fitted by k-means, each on what the previous ones left (residual VQ)."""
        probe = cls(config, np.zeros((config.codebooks, config.codebook_size, config.n_mels), np.float32))
        residual = np.concatenate([probe.log_mel(w) for w in waves]) if waves else np.zeros((0, config.n_mels))
        if len(residual) < config.codebook_size:
            raise ValueError(f"TinyCodec.fit: {len(residual)} frames from {len(waves)} waves cannot fit "
                             f"{config.codebook_size} centroids; give more audio or a smaller codebook_size")
        centroids = []
        for _ in range(config.codebooks):
            km = KMeans(n_clusters=config.codebook_size, n_init=1, random_state=seed).fit(residual)
            centroids.append(km.cluster_centers_)
            residual = residual - km.cluster_centers_[km.labels_]
        return cls(config, np.stack(centroids))

    def encode(self, wave: np.ndarray) -> torch.Tensor:
        residual = self.log_mel(wave)
        codes = []
        for book in self.centroids:
            idx = pairwise_distances_argmin(residual, book)
            codes.append(idx)
            residual = residual - book[idx]
        return torch.from_numpy(np.stack(codes)).long()

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        if codes.ndim != 2 or codes.shape[0] != self.codebooks:
            raise ValueError(f"TinyCodec.decode: codes must be [{self.codebooks}, frames], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"TinyCodec.decode: codes must lie in [0, {self.codebook_size}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        idx = codes.cpu().numpy()
        log_mel = sum(book[i] for book, i in zip(self.centroids, idx))  # [frames, n_mels]
        c = self.config
        wave = librosa.feature.inverse.mel_to_audio(np.exp(log_mel).T, sr=c.sample_rate, n_fft=c.n_fft,
                                                    hop_length=c.hop_length, power=2.0,
                                                    n_iter=c.griffin_lim_iters)
        return wave.astype(np.float32)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tiny_codec.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        save_file({"centroids": self.centroids}, str(folder / "tiny_codec.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> "TinyCodec":
        folder = Path(folder)
        config_file = folder / "tiny_codec.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} is missing: a tiny codec folder is written by TinyCodec.save")
        config = from_dict(TinyCodecConfig, json.loads(config_file.read_text()), str(config_file))
        return cls(config, load_file(str(folder / "tiny_codec.safetensors"))["centroids"])

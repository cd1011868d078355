"""A codec that needs no pretrained weights and still makes real audio: log-mel frames quantised by
residual k-means codebooks fitted on the corpus (coarse to fine, like a neural codec's residual VQ),
decoded by inverting the mel filterbank and Griffin-Lim (librosa; tiny_codebook.py, which exports ship).
For the tiny world and its tests."""
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
from omni.speech.tiny_codebook import CODEBOOKS_FILE, CONFIG_FILE, TinyCodebooks, TinyCodecConfig

LOG_FLOOR = 1e-5  # mel power below this is silence; keeps log finite


class TinyCodec(TinyCodebooks):
    """Residual-VQ log-mel codec; `fit` learns its codebooks, `save`/`load` keep them."""

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

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        save_file({"centroids": self.centroids}, str(folder / CODEBOOKS_FILE))

    @classmethod
    def load(cls, folder: str | Path) -> "TinyCodec":
        folder = Path(folder)
        config_file = folder / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} is missing: a tiny codec folder is written by TinyCodec.save")
        config = from_dict(TinyCodecConfig, json.loads(config_file.read_text()), str(config_file))
        return cls(config, load_file(str(folder / CODEBOOKS_FILE))["centroids"])

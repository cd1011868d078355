"""The codec interface the talker is trained against: a mono wave at `sample_rate` in, discrete
codes [codebooks, frames] out (`frame_rate` frames a second), and back. Two kinds implement it:
`TinyCodec` (no weights to download, fitted on the corpus) and `MimiCodec` (a pretrained neural codec)."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Codec(Protocol):
    sample_rate: int
    frame_rate: float
    codebooks: int
    codebook_size: int

    def encode(self, wave: np.ndarray) -> torch.Tensor:
        """float32 [samples] at `sample_rate` -> int64 codes [codebooks, frames], each in [0, codebook_size)."""

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """int64 codes [codebooks, frames] -> float32 wave [samples] at `sample_rate`."""

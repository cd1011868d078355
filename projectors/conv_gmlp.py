"""Audio projector: Conv-GMLP downsampling (Baichuan-Omni).

Whisper emits 50 frames/s, too many for the LLM; a strided gated conv keeps local temporal
detail while cutting the rate by ``stride`` (stride 4 -> 12.5 tokens/s).

For x of shape [N, T, in_dim], with windows of ``stride`` consecutive frames:
  main      a = conv_a(x), b = conv_b(x)  (Conv1d, kernel = stride = stride, over time)
            h = a * silu(b);  main = proj(h)               (Linear hidden_dim -> out_dim)
  shortcut  mean of x over each window, then Linear in_dim -> out_dim
  out       main + shortcut                                 [N, ceil(T / stride), out_dim]
T is right-padded with zeros to a multiple of ``stride`` for the convs; the shortcut's last
window averages only the real frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvGMLPProjector(nn.Module):
    """Maps audio encoder frames [N, T, in_dim] to LLM embeddings [N, ceil(T/stride), out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 4, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("stride", stride), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ConvGMLPProjector: {name} must be a positive int, got {value!r}")
        self.stride = stride
        self.conv_a = nn.Conv1d(in_dim, hidden_dim, kernel_size=stride, stride=stride)
        self.conv_b = nn.Conv1d(in_dim, hidden_dim, kernel_size=stride, stride=stride)
        self.proj = nn.Linear(hidden_dim, out_dim)
        self.shortcut = nn.Linear(in_dim, out_dim)

    def num_tokens(self, input_len: int) -> int:
        """ceil(input_len / stride)."""
        if input_len <= 0:
            raise ValueError(f"ConvGMLPProjector: input_len must be positive, got {input_len}")
        return -(-input_len // self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"ConvGMLPProjector: expected [N, T, in_dim], got shape {tuple(x.shape)}")
        t = x.shape[1]
        pad = self.num_tokens(t) * self.stride - t
        xt = x.transpose(1, 2)  # [N, in_dim, T]
        padded = F.pad(xt, (0, pad))
        h = self.conv_a(padded) * F.silu(self.conv_b(padded))
        main = self.proj(h.transpose(1, 2))
        # ceil_mode clips the last window to the real frames, so its mean ignores the padding.
        mean = F.avg_pool1d(xt, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
        return main + self.shortcut(mean.transpose(1, 2))

"""Vision projector: optional 2x2 spatial pooling, then a LLaVA-style 2-layer MLP.

Pooling cuts the token count ~4x before the LLM (729 SigLIP patches -> 182 tokens), which is
what makes multi-frame video affordable. With ``pool=False`` this is exactly the LLaVA
projector (``linear_1``, ``act``, ``linear_2`` with bias, exact GELU), so its weights map
one-to-one onto transformers' ``LlavaMultiModalProjector``.

Pooling rule, for a row-major grid of G x G tokens (token ``r * G + c`` is row r, column c):
average-pool with 2x2 windows at stride 2; output rows = floor(G / 2) (an odd last row is
dropped), output columns = ceil(G / 2) (an odd last column is averaged over its 2x1 window of
two real values, never diluted by padding). Output is row-major again.
So 27x27 -> 13x14 = 182 (Baichuan-Omni's count), 8x8 -> 4x4 = 16, 7x7 -> 3x4 = 12.
G = 1 would give zero tokens, so pooling requires G >= 2 and raises otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens) if num_tokens > 0 else 0
    if side * side != num_tokens or side == 0:
        raise ValueError(
            f"MLPProjector: {num_tokens} input tokens do not form a square grid; "
            "the vision tower must return G*G patch tokens (no class token)"
        )
    return side


class MLPProjector(nn.Module):
    """Maps vision patch tokens [N, T, in_dim] to LLM embeddings [N, num_tokens(T), out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, pool: bool = True):
        super().__init__()
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MLPProjector: {name} must be a positive int, got {value!r}")
        self.pool = pool
        self.linear_1 = nn.Linear(in_dim, hidden_dim, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim, bias=True)

    def num_tokens(self, input_len: int) -> int:
        """Output tokens for ``input_len`` = G*G input tokens (see the module docstring)."""
        if not self.pool:
            if input_len <= 0:
                raise ValueError(f"MLPProjector: input_len must be positive, got {input_len}")
            return input_len
        side = _grid_side(input_len)
        if side < 2:
            raise ValueError("MLPProjector: 2x2 pooling needs a grid of at least 2x2, got 1x1")
        return (side // 2) * ((side + 1) // 2)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        side = _grid_side(t)
        self.num_tokens(t)  # validates side >= 2
        grid = x.transpose(1, 2).reshape(n, d, side, side)
        grid = grid[:, :, : 2 * (side // 2), :]  # drop an odd last row
        # ceil_mode keeps the odd last column; its window is clipped to the input, so the
        # divisor counts only the 2 real values.
        pooled = F.avg_pool2d(grid, kernel_size=2, stride=2, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"MLPProjector: expected [N, T, in_dim], got shape {tuple(x.shape)}")
        if self.pool:
            x = self._pool(x)
        return self.linear_2(self.act(self.linear_1(x)))

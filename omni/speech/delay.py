"""The delay pattern (MusicGen's): codebook k of a [K, T] code grid is shifted right by k frames, so
one decoder step predicts all K codebooks at once while codebook k still sees codebooks < k of the
same frame one step earlier (docs/decisions.md). Each codebook's vocabulary gets two ids past the
codes: PAD before its first frame, EOS from just after its last one."""
from __future__ import annotations

import torch


def pad_id(codebook_size: int) -> int:
    return codebook_size


def eos_id(codebook_size: int) -> int:
    return codebook_size + 1


def delay(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """[K, T] codes -> [K, T + K] steps: out[k, t + k] = codes[k, t], PAD before, EOS after (at least one)."""
    if codes.ndim != 2:
        raise ValueError(f"delay: codes must be [codebooks, frames], got {list(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"delay: codes must lie in [0, {codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
    k, t = codes.shape
    out = torch.full((k, t + k), eos_id(codebook_size), dtype=torch.long)
    for book in range(k):
        out[book, :book] = pad_id(codebook_size)
        out[book, book:book + t] = codes[book]
    return out


def undelay(steps: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """The inverse of `delay`: [K, S] steps -> [K, T], T being where codebook 0 says EOS. Anything
    but that layout (a PAD or EOS inside the frames, a codebook ending early) is an error."""
    if steps.ndim != 2:
        raise ValueError(f"undelay: steps must be [codebooks, steps], got {list(steps.shape)}")
    k = steps.shape[0]
    ends = (steps[0] == eos_id(codebook_size)).nonzero()
    if not len(ends):
        raise ValueError("undelay: codebook 0 never says EOS; the steps are cut before the end of the speech")
    t = int(ends[0])
    if steps.shape[1] < t + k:
        raise ValueError(f"undelay: {steps.shape[1]} steps are too few for {t} frames of {k} codebooks "
                         f"(the delay pattern needs {t + k})")
    codes = torch.stack([steps[book, book:book + t] for book in range(k)])
    for book in range(k):
        if (steps[book, :book] != pad_id(codebook_size)).any():
            raise ValueError(f"undelay: codebook {book} has something other than PAD before its first frame")
        if steps[book, book + t] != eos_id(codebook_size):
            raise ValueError(f"undelay: codebook {book} does not end (EOS) where codebook 0 does")
    if codes.numel() and codes.max() >= codebook_size:
        raise ValueError("undelay: a PAD or EOS lies inside the frames")
    return codes

"""The LM's next-token loss without materialising the full logits of a long sequence.

transformers' causal LMs compute logits for every position and upcast them to fp32 before the
cross-entropy: for Qwen2-7B (vocabulary 152,064) one 8k-token micro-batch is 8192 x 152064 fp32
= 5 GB of logits, plus their bf16 original and the gradient of each. `chunked_lm_loss` takes the
final hidden states instead, keeps only the positions that predict a label, and computes head,
cross-entropy and max-z loss chunk by chunk under activation checkpointing, so at most one chunk's
logits exist at a time, in forward and in backward. The result is the same loss and gradients as
the plain path (tests/unit/test_lm_loss.py) up to summation order; OmniModel.forward switches to it
only above `CHUNKED_ABOVE_LOGITS` (docs/decisions.md: "Chunked LM loss").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNKED_ABOVE_LOGITS = 2 ** 28   # logits elements (1 GiB in fp32) of a micro-batch above which the loss is chunked
CHUNK_LOGITS = 2 ** 26           # logits elements of one chunk (256 MiB in fp32)


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, num_items: float | None = None,
                    z_coef: float = 0.0, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """Cross-entropy (+ `z_coef` * max-z loss, Baichuan 2) of `head(hidden)` against `labels`
    shifted by one, as transformers' ForCausalLMLoss computes it: summed over label tokens and
    divided by `num_items`, or their mean when None. hidden [B, T, D], labels [B, T]."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    keep = targets != IGNORE
    h, t = hidden[keep], targets[keep]
    vocab = head.weight.shape[0]
    rows = max(1, chunk_logits // vocab)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], rows):
        total = total + checkpoint(_chunk_loss, head, h[start:start + rows], t[start:start + rows], z_coef,
                                   use_reentrant=False)
    return total / (num_items if num_items else max(h.shape[0], 1))


def _chunk_loss(head: nn.Module, h: torch.Tensor, t: torch.Tensor, z_coef: float) -> torch.Tensor:
    logits = head(h).float()
    loss = F.cross_entropy(logits, t, reduction="sum")
    if z_coef > 0:
        loss = loss + z_coef * (logits.max(dim=-1).values ** 2).sum()
    return loss


"""Baichuan 2 LLM training options (Yang et al., 2023, "Baichuan 2", section 2.5-2.6).

- NormHead: the output embedding rows are L2-normalised before the logits are taken,
  logits = h @ normalize(W, dim=-1).T, which stabilises training and keeps rare-token rows from
  dominating by norm. Swapped in through transformers' `set_output_embeddings`, keeping the
  parameter name `lm_head.weight`, so checkpoints and optimizer state are unchanged.
- max-z loss: an auxiliary loss coef * z^2 on the largest logit z of each predicted token
  (coef 2e-4 in the report), which keeps logits from drifting large and makes inference robust
  to the temperature/repetition-penalty settings. Averaged over the positions that carry a label.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_Z_COEF = 2e-4  # Baichuan 2 report


class NormHead(nn.Linear):
    """An lm_head whose weight rows are unit-normalised in every forward pass."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, F.normalize(self.weight, dim=-1), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NormHead":
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype)
        head.weight = linear.weight  # same Parameter: tying and names survive
        if linear.bias is not None:
            head.bias = linear.bias
        return head


def use_norm_head(llm) -> None:
    """Replace the LLM's output embedding with a NormHead over the same weights."""
    head = llm.get_output_embeddings()
    if not isinstance(head, NormHead):
        llm.set_output_embeddings(NormHead.from_linear(head))


def max_z_loss(logits: torch.Tensor, labels: torch.Tensor, coef: float,
               num_items: float | None = None) -> torch.Tensor:
    """coef * (max logit)^2 averaged over labelled next-token positions (or summed and divided
    by `num_items`, the same normaliser as the cross-entropy it is added to)."""
    predicting = labels[:, 1:] != -100          # position t predicts label t+1
    z = logits[:, :-1].float().max(dim=-1).values
    if not predicting.any():
        return logits.new_zeros(())
    squares = z[predicting] ** 2
    return coef * (squares.sum() / num_items if num_items else squares.mean())

"""Preference and reward losses on per-sequence log-probabilities.

Notation: pc, pr = policy log-prob of the chosen / rejected completion (summed over its tokens),
rc, rr = the reference model's, lc, lr = completion lengths in tokens, beta > 0.
    sigmoid       DPO (Rafailov et al. 2023):   -log sigmoid(beta * ((pc - rc) - (pr - rr)))
    ipo           IPO (Azar et al. 2023) on per-token log-ratios, as TRL computes it:
                  ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 beta))^2
    sigmoid_norm  length-normalised DPO:         -log sigmoid(beta * ((pc - rc) / lc - (pr - rr) / lr))
    simpo         SimPO (Meng et al. 2024), no reference: -log sigmoid(beta * (pc / lc - pr / lr) - gamma)
The implicit rewards logged are beta * (pc - rc) and beta * (pr - rr) (SimPO: beta * pc / lc, ...).
`tests/unit/test_align_trl_parity.py` checks each against TRL's own code (DPOTrainer, CPOTrainer).

The reward model's Bradley-Terry loss is computed with its head (omni/align/objectives/rm.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omni.model.fusion import IGNORE

LOSS_TYPES = ("sigmoid", "ipo", "sigmoid_norm", "simpo")
REFERENCE_FREE = ("simpo",)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the label tokens of each row and their count. Position t predicts
    labels[t + 1] (the causal shift); IGNORE labels do not count. fp32 throughout."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    safe = targets.masked_fill(~mask, 0)
    token_logps = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def preference_loss(loss_type: str, beta: float, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                    chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
                    gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit chosen / rejected rewards [B] (detached)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: choose one of {list(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError("beta must be > 0")
    needs_len = loss_type in ("ipo", "sigmoid_norm", "simpo")
    if needs_len and (chosen_len is None or rejected_len is None):
        raise ValueError(f"loss_type {loss_type!r} needs the completion lengths")
    if loss_type not in REFERENCE_FREE and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss_type {loss_type!r} needs the reference model's log-probs")
    if needs_len:
        lc, lr = chosen_len.clamp(min=1).to(policy_chosen.dtype), rejected_len.clamp(min=1).to(policy_chosen.dtype)
    if loss_type == "simpo":
        chosen, rejected = policy_chosen / lc, policy_rejected / lr
        losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
        return losses, (beta * chosen).detach(), (beta * rejected).detach()
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        losses = (chosen_ratio / lc - rejected_ratio / lr - 1 / (2 * beta)) ** 2
    else:  # sigmoid_norm
        losses = -F.logsigmoid(beta * (chosen_ratio / lc - rejected_ratio / lr))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


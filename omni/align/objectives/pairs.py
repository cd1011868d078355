"""What the preference objectives (DPO, RM) share: a record is one (prompt, chosen, rejected) pair,
the unit is a pair, a batch holds the chosen rows and then the rejected ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni.align.losses import sequence_logps
from omni.align.objectives.base import Objective, fill
from omni.data.records import preference_examples
from omni.model.batch import MediaBatch
from omni.model.processor import Batch, collate


@dataclass
class PairBatch:
    batch: Batch                          # 2B rows: the B chosen, then the B rejected
    ref: torch.Tensor | None = None       # [2B] precomputed reference log-probs (same order)

    @property
    def media(self) -> MediaBatch:
        return self.batch.media

    def to(self, device) -> PairBatch:
        return PairBatch(self.batch.to(device), None if self.ref is None else self.ref.to(device))


def pair_batch(made: list, pad_id: int, ref: torch.Tensor | None = None) -> tuple[PairBatch, float]:
    """Made pairs (where, chosen, rejected) -> the batch and its fill."""
    rows = [c for _, c, _ in made] + [r for _, _, r in made]
    batch = collate(rows, pad_id)
    return PairBatch(batch, ref), fill(batch)


def policy_logps(module, batch: Batch, blank: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    logits = module(batch.input_ids, batch.attention_mask, media=batch.media, blank=blank).logits
    return sequence_logps(logits, batch.labels)


class Pairs(Objective):
    """Preference objectives: a record is one (prompt, chosen, rejected) pair; the unit is a pair."""

    def make(self, record):
        return (record.get("__where__"), *preference_examples(self.processor, record))

    def units(self, batch) -> int:
        return batch.batch.input_ids.shape[0] // 2

    def lengths(self, made):
        return [len(x.input_ids) for _, c, r in made for x in (c, r)]

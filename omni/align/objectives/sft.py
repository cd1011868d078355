"""SFT, what every omni stage does: loss on assistant tokens only, every assistant turn
(`sft.turns: all`) or the last one (`last`); system messages and multi-turn history are context.
Packing (`batch.tokens_per_pack`) reuses omni's packer. Held-out: token-mean loss and next-token
accuracy on assistant tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omni.align.objectives.base import Objective, fill
from omni.data.packing import collate_packed
from omni.data.records import sft_example
from omni.model.fusion import IGNORE
from omni.model.processor import collate


class SFT(Objective):
    name = "sft"

    def make(self, record):
        return sft_example(self.processor, record, self.cfg.sft.turns)

    def collate(self, made):
        if self.cfg.batch.tokens_per_pack:
            return collate_packed(made)
        batch = collate(made, self.tokenizer.pad_token_id)
        return batch, fill(batch)

    def units(self, batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE).sum())

    def lengths(self, made):
        return [len(e.input_ids) for e in made]

    def loss(self, module, batch, denom, blank=()):
        out = module(batch.input_ids, batch.attention_mask, batch.labels, batch.media,
                     position_ids=batch.position_ids, num_items_in_batch=denom, blank=blank)
        return out.loss, {}

    def eval_batch(self, records):
        return collate([self.make(r) for r in records], self.tokenizer.pad_token_id).to(self.device)

    @torch.no_grad()
    def score(self, module, batch, blank=()):
        logits = module(batch.input_ids, batch.attention_mask, media=batch.media, blank=blank).logits[:, :-1].float()
        target = batch.labels[:, 1:]
        mask = target != IGNORE
        count = int(mask.sum())
        total = float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
        correct = float((logits.argmax(-1)[mask] == target[mask]).sum())
        return {"loss": total / max(count, 1), "token_accuracy": correct / max(count, 1), "tokens": count}

"""What every objective implements, for omni's one trainer (omni/train/trainer.py) on any engine.

An objective turns records (omni/data/records.py: chat or preference, from JSONL or from the stage's
WebDataset stream) into micro-batches and a micro-batch into a *summed* loss over its units (label
tokens for SFT, pairs for DPO/RM) divided by the units of the whole step over all processes, so any
split of a step into micro-batches and processes gives the same gradient. It also scores held-out
records before, during and after training.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from omni.distributed import World
from omni.model.omni_model import OmniModel
from omni.model.processor import Batch, OmniProcessor


class Objective(ABC):
    """What SFT / DPO / RM implement. `module` is the trained nn.Module the engine wraps (the omni
    model, or a wrapper around it offering `save_pretrained(dir, tokenizer, state_dict=None)` and
    `load_weights(dir)`, as OmniModel does)."""
    name = "objective"  # the `method:` of a stage config that picks it (omni/align/objectives/__init__.py)

    def __init__(self, cfg):
        self.cfg = cfg  # the stage's config (omni/train/config.py StageConfig); read, never imported here

    def prepare(self, model: OmniModel, tokenizer, processor: OmniProcessor, out_dir: Path,
                train: list | None, evals: list, world: World) -> nn.Module:
        """The module to train; `train`: the in-memory training records (None when streamed)."""
        self.tokenizer, self.processor, self.world, self.device = tokenizer, processor, world, world.device
        return self.wrap(model)

    def wrap(self, model: OmniModel) -> nn.Module:
        """The module this objective trains around `model` (no data needed: omni consolidate
        rebuilds it to write a checkpoint's weights)."""
        return model

    def trainable(self, globs: list[str]) -> list[str]:
        return globs

    @abstractmethod
    def make(self, record: dict):
        """One record -> what `collate` takes (raise on a bad record: it is skipped and counted)."""

    @abstractmethod
    def collate(self, made: list) -> tuple[object, float]:
        """Made records -> (one batch with `.to(device)` and `.media`, its fill: real tokens / batch tokens)."""

    @abstractmethod
    def units(self, batch) -> int:
        """What the loss is normalised by (tokens or pairs) in this batch."""

    @abstractmethod
    def lengths(self, made: list) -> list[int]:
        """Token count of every sequence the made records run (model FLOPs)."""

    @abstractmethod
    def loss(self, module, batch, denom: float, blank: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict]:
        """Summed loss of the batch / denom, and stats (floats) for the log. `blank`: modalities to
        run on a blank input (engines that shard per module; OmniModel.embed)."""

    @abstractmethod
    def eval_batch(self, records: list):
        """The batch (on the device, with `.media`) held-out scoring runs for at most a micro-batch of records."""

    @abstractmethod
    def score(self, module, batch, blank: tuple[str, ...] = ()) -> dict:
        """Held-out result of one `eval_batch`: float means and the int count they are over (tokens,
        pairs), so that `merge_shares` joins batches and ranks. `blank`: as in `loss`."""

    @torch.no_grad()
    def evaluate(self, module, records: list) -> dict:
        """Held-out result of the records, a micro-batch at a time ({} for none)."""
        batches = (self.eval_batch(c) for c in chunks(records, self.cfg.batch.micro_batch))
        return merge_shares([self.score(module, b) for b in batches])


def merge_shares(parts: list[dict]) -> dict:
    """One held-out result from results on parts of the records (batches, ranks' shares): an
    objective's int field is the count (tokens, pairs), summed; its float fields are means over
    that count, weighted by it. Empty parts (a rank with no records) are left out."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    count = next(k for k, v in parts[0].items() if isinstance(v, int))
    total = sum(p[count] for p in parts)
    return {k: total if k == count else sum(p[k] * p[count] for p in parts) / max(total, 1) for k in parts[0]}


def chunks(items: list, n: int):
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + n]


def fill(batch: Batch) -> float:
    return float(batch.attention_mask.float().mean())

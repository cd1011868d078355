"""Sequence packing: a micro-batch's samples back to back in ONE row, each attending only to itself.

The row holds every sample of the micro-batch in stream order, no padding and no attention mask,
with position ids restarting at 0 for each sample. transformers turns those resets into isolation
on every backend, but flash_attention_2 only for a single row (`_is_packed_sequence` is False for
batch size != 1; then it would run plain causal attention over the whole row): there it derives
the varlen `cu_seqlens` from the resets (`prepare_fa_kwargs_from_position_ids`); `sdpa_varlen`
(omni/model/varlen_attention.py) cuts the row at the same resets and attends per sample; SDPA and
eager get a block-diagonal causal mask (masking_utils' `find_packed_sequence_indices`). Media stay in
sample order, so fusion is unchanged. The loss equals the padded batch's loss (same label tokens,
same sum); packing only removes padding. `batch.tokens_per_pack` is the row length a stage plans
memory for (omni plan); the trainer warns when a micro-batch's row is longer.
"""
from __future__ import annotations

import torch

from omni.model.batch import MediaBatch
from omni.model.fusion import IGNORE
from omni.model.processor import Batch, Example


def collate_packed(examples: list[Example]) -> tuple[Batch, float]:
    """One padding-free row [1, sum of lengths] of the examples; returns the batch and its fill
    (real tokens / tokens computed: 1.0, nothing is padding)."""
    ids = torch.cat([e.input_ids for e in examples])[None]
    labels = torch.cat([e.labels for e in examples])[None]
    pos = torch.cat([torch.arange(len(e.input_ids)) for e in examples])[None]
    labels[pos == 0] = IGNORE  # never predict a sample's first token from its neighbour
    batch = Batch(ids, None, labels, MediaBatch.concat([e.media for e in examples]), position_ids=pos)
    return batch, 1.0

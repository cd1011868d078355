"""Sequence packing: several samples per row, each attending only to itself.

Rows hold whole samples (first-fit decreasing into a token budget) with position ids restarting
at 0 for each sample and no attention mask. transformers turns position-id resets into
isolation itself: a block-diagonal causal mask for SDPA/eager (masking_utils'
`find_packed_sequence_indices`) and varlen `cu_seqlens` for flash_attention_2. Media stay in
row-major placeholder order, so fusion is unchanged. The loss equals the padded batch's loss
(same label tokens, same mean); packing only removes padding.
"""
from __future__ import annotations

import torch

from omni.model.batch import MediaBatch
from omni.model.fusion import IGNORE
from omni.model.processor import Batch, Example


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= budget (a longer sample gets its own bin)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]  # keep stream order inside a row


def collate_packed(examples: list[Example], budget: int, pad_id: int) -> tuple[Batch, float]:
    """Pack examples into rows of `budget` tokens; returns the batch and its packing efficiency
    (real tokens / row tokens)."""
    lengths = [len(e.input_ids) for e in examples]
    bins = first_fit_decreasing(lengths, budget)
    width = max(budget, max(lengths))
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    media = []
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            e, n = examples[i], lengths[i]
            ids[r, at: at + n] = e.input_ids
            labels[r, at: at + n] = e.labels
            labels[r, at] = IGNORE  # never predict a sample's first token from its neighbour
            pos[r, at: at + n] = torch.arange(n)
            media.append(e.media)
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding tail is a sequence of its own
    batch = Batch(ids, None, labels, MediaBatch.concat(media), position_ids=pos)
    return batch, sum(lengths) / ids.numel()

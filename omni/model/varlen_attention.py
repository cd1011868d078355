"""SDPA per packed sample: varlen attention semantics without FlashAttention-2.

A packed micro-batch is one row whose position ids restart at 0 for each sample
(omni/data/packing.py). transformers' "sdpa" attends over the whole row with a block-diagonal mask,
so a row of samples costs (sum of lengths)^2; FlashAttention-2's varlen kernel costs the sum of
each sample's square. "sdpa_varlen" (registered with transformers' AttentionInterface, so any
model that dispatches through ALL_ATTENTION_FUNCTIONS can use it) cuts a packed row at the
position-id resets and calls transformers' own SDPA attention once per sample, causal, without a
mask. Anything else (padded rows, one sample, decoding with a KV cache, sliding-window layers)
goes to that SDPA attention unchanged, with its mask.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, find_packed_sequence_indices, sdpa_mask

NAME = "sdpa_varlen"


def packed_lengths(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """The samples' lengths when q/k are one packed row (one batch row, no cache: as many keys as
    queries, position ids starting at 0 and restarting somewhere), else None."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    position_ids = position_ids[:1]
    if position_ids.shape[-1] != query.shape[2] or int(position_ids[0, 0]) != 0:
        return None
    sequence = find_packed_sequence_indices(position_ids)  # the same segmentation the SDPA mask uses
    if sequence is None:
        return None
    return torch.bincount(sequence[0]).tolist()


def sdpa_varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None,
                                  position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; q/k/v are [batch, heads, tokens, head_dim],
    the output [batch, tokens, heads, head_dim] as sdpa_attention_forward returns it."""
    lengths = None if kwargs.get("sliding_window") else packed_lengths(position_ids, query, key)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
               for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # padded rows and decoding get SDPA's own mask

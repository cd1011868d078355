"""Placing projected media features into the text embedding sequence.

The processor expanded each placeholder into exactly `projector.num_tokens(...)` copies of the
modality's token id; here those positions receive the features in order (k-th placeholder of a
kind <- k-th medium of that kind, row-major over the batch). A count mismatch means the
processor and model disagree about the token arithmetic, so it fails loudly.
"""
from __future__ import annotations

import torch


class PlaceholderMismatchError(ValueError):
    """Placeholder positions and projected feature tokens differ in number."""


def scatter_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor, modality: str
) -> torch.Tensor:
    """Return `embeds` with the `token_id` positions replaced by `features` ([n, D]) in order."""
    mask = input_ids == token_id
    n_pos = int(mask.sum())
    if n_pos != features.shape[0]:
        raise PlaceholderMismatchError(
            f"{modality}: {n_pos} placeholder positions in input_ids but {features.shape[0]} feature "
            f"tokens from the {modality} projector; the processor's token counts and the model's "
            f"encoder/projector settings disagree (were they built from the same preset?)"
        )
    if features.shape[-1] != embeds.shape[-1]:
        raise PlaceholderMismatchError(
            f"{modality}: projector width {features.shape[-1]} != LLM hidden size {embeds.shape[-1]}"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

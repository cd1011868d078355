"""Placing projected media features into the text embedding sequence.

The processor expanded each placeholder into exactly `projector.num_tokens(...)` copies of the
modality's token id; here those positions receive the features in order (k-th placeholder of a
kind <- k-th medium of that kind, row-major over the batch). A count mismatch means the
processor and model disagree about the token arithmetic, so it fails loudly.
"""
from __future__ import annotations

import torch

IGNORE = -100  # label of positions that carry no loss (prompt, media, padding)


def expand_placeholders(ids: list[int], targets: list[int], token_ids: dict[str, int],
                        counts: dict[str, list[int]], seen: dict[str, int] | None = None
                        ) -> tuple[list[int], list[int]]:
    """Repeat each placeholder id as many times as its medium has feature tokens.

    `targets` marks the ids the model is trained to produce (1) — they keep their id as label,
    everything else and every media position gets IGNORE. `counts[modality][k]` is the token
    count of that modality's k-th medium; `seen` carries the per-modality position across calls
    (a batch of samples sharing one media list), and is updated in place."""
    by_id = {tid: m for m, tid in token_ids.items()}
    seen = seen if seen is not None else {}
    out_ids: list[int] = []
    out_labels: list[int] = []
    for tid, is_target in zip(ids, targets):
        modality = by_id.get(tid)
        if modality is None:
            out_ids.append(tid)
            out_labels.append(tid if is_target else IGNORE)
            continue
        k = seen.get(modality, 0)
        n = counts[modality][k]
        seen[modality] = k + 1
        out_ids.extend([tid] * n)
        out_labels.extend([IGNORE] * n)
    return out_ids, out_labels


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

"""Projectors: map encoder tokens into the LLM embedding space (no dependency on ``omni``)."""

from __future__ import annotations

from torch import nn

from projectors.conv_gmlp import ConvGMLPProjector
from projectors.mlp import MLPProjector

PROJECTORS: dict[str, type[nn.Module]] = {"mlp": MLPProjector, "conv_gmlp": ConvGMLPProjector}


def build_projector(kind: str, **kwargs) -> nn.Module:
    """Build a projector by registry name, so configs can name one ("mlp", "conv_gmlp")."""
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector kind {kind!r}; known kinds: {sorted(PROJECTORS)}")
    return PROJECTORS[kind](**kwargs)


__all__ = ["PROJECTORS", "ConvGMLPProjector", "MLPProjector", "build_projector"]

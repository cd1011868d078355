"""Parity tests compare omni against reference implementations on tiny random-init models.

Every comparison goes through ``check_close``: it prints the measured max abs difference
(visible with ``pytest -s``; also recorded as a junit property) before asserting the bound.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def check_close(record_property, request):
    def check(what: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}"
        diff = (got.detach().double() - want.detach().double()).abs().max().item()
        print(f"\n[parity] {request.node.name}: {what}: max abs diff {diff:.3e} (bound {atol:.0e})")
        record_property(what, diff)
        assert diff <= atol, f"{what}: max abs diff {diff:.3e} exceeds {atol:.0e}"
        return diff

    return check

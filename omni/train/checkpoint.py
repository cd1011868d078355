"""Atomic checkpoints: written to a temporary folder, then renamed into place.

A run killed mid-write leaves either the previous checkpoint or the new one, never a torn
folder. Resumable checkpoints hold the full training state (weights, optimizer, scheduler,
RNGs, step, raw samples consumed) so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

STATE = "trainer_state.pt"


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_model_dir(model, tokenizer, target: str | Path) -> Path:
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, tokenizer)
    return Path(target)


def save_resumable(model, tokenizer, optimizer, scheduler, step: int, samples: list[int],
                   ckpt_root: str | Path, keep: int) -> Path:
    """`samples`: raw samples each rank has consumed (its stream position)."""
    ckpt_root = Path(ckpt_root)
    target = ckpt_root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, tokenizer)
        torch.save({
            "step": step, "samples": samples,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": np.random.get_state()},
        }, tmp / STATE)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return target


def latest_resumable(ckpt_root: str | Path) -> Path | None:
    done = sorted(p for p in Path(ckpt_root).glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def load_resumable(path: Path, model, optimizer, scheduler) -> tuple[int, list[int]]:
    """Restore training state in place; returns (step, raw samples consumed per rank)."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"], state["samples"]

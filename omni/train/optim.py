"""What trains, at which learning rate, on which schedule (a stage's `optim:` section, OptimConfig).

Trainable parameters are chosen by globs over parameter names (a stage's `trainable` list);
everything else is frozen (requires_grad=False) and never handed to the optimizer.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from omni.config import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_groups: dict[str, float] = field(default_factory=dict)  # param-name glob -> lr; first match wins
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0              # 0 disables clipping

    def __post_init__(self):
        if self.lr <= 0 or any(v <= 0 for v in self.lr_groups.values()):
            raise ConfigError("optim: learning rates must be > 0")
        if len(self.betas) != 2:
            raise ConfigError("optim.betas: expected two numbers")


def set_trainable(model: nn.Module, globs: list[str]) -> list[str]:
    """Freeze all parameters, then unfreeze those matching any glob; returns trainable names."""
    names = [n for n, _ in model.named_parameters()]
    unused = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if unused:
        prefixes = sorted({".".join(n.split(".")[:2]) for n in names})
        raise ConfigError(f"trainable: glob(s) {unused} match no parameter; parameter prefixes: {prefixes}")
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, g) for g in globs))
        if p.requires_grad:
            chosen.append(name)
    return chosen


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with one group per (lr, decay) pair; lr from the first matching `lr_groups` glob.
    torch's fused kernel (CPU and CUDA): one pass over each tensor instead of a dozen element-wise
    ops, about 9x faster than the per-tensor loop on a CPU for the same update (bench/mfu.py)."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = next((v for g, v in cfg.lr_groups.items() if fnmatch.fnmatchcase(name, g)), cfg.lr)
        decay = p.ndim >= 2  # no weight decay on biases and norm scales
        groups.setdefault((lr, decay), []).append(p)
    if not groups:
        raise ConfigError("no trainable parameters: check the stage's `trainable` globs")
    param_groups = [
        {"params": ps, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (lr, decay), ps in groups.items()
    ]
    return torch.optim.AdamW(param_groups, betas=tuple(cfg.betas), fused=True)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup to 1, then cosine to `min_lr_ratio` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))

"""The objective sections of a stage config (omni/train/config.py `StageConfig`): one per `method:`.

Align runs are ordinary stages: `omni align sft|dpo|rm CONFIG` and `omni train CONFIG` run the same
config through the same trainer; `method:` picks the objective (omni/align/objectives/).

    name: align-dpo
    method: dpo                 # sft (the omni stages' default) | dpo | rm
    init_from: runs/sft/final   # an omni model folder (a stage's or an align run's final/)
    trainable: ["llm.*"]        # globs over the omni model's parameter names (the RM head always trains)
    data: {records: pref_train.jsonl, eval: pref_val.jsonl}
    steps: 100
    dpo: {loss_type: sigmoid, beta: 0.1, precompute_ref: true}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from omni.align.losses import LOSS_TYPES
from omni.config import ConfigError


@dataclass
class SFTSection:
    turns: Literal["all", "last"] = "all"   # loss on every assistant turn or only the last one


@dataclass
class DPOSection:
    loss_type: str = "sigmoid"          # sigmoid (DPO) | ipo | sigmoid_norm | simpo
    beta: float = 0.1
    gamma: float = 0.5                  # SimPO target margin
    reference: str | None = None        # reference model folder; None: init_from
    precompute_ref: bool = True         # reference log-probs once before training, then the model is freed

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"dpo.loss_type: {self.loss_type!r} is not one of {list(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ConfigError("dpo.beta must be > 0")


@dataclass
class RMSection:
    center_rewards: float = 0.0         # coefficient of mean((r_c + r_r)^2), keeps rewards centred (0: off)

"""Align stage configs: one strict YAML per run (unknown keys are errors, dotted overrides apply),
sharing the optimiser / batch / checkpoint / log sections with the omni stage config.

    name: align-dpo
    method: dpo                 # sft | dpo | rm
    init_from: runs/sft/final   # an omni model folder (a stage's or an align run's final/)
    trainable: ["llm.*"]        # globs over the omni model's parameter names (the RM head always trains)
    data: {train: pref_train.jsonl, eval: pref_val.jsonl}
    steps: 100
    dpo: {loss_type: sigmoid, beta: 0.1, precompute_ref: true}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omni.align.losses import LOSS_TYPES
from omni.config import ConfigError, load_config
from omni.train.config import BatchConfig, CheckpointConfig, LogConfig, OptimConfig

METHODS = ("sft", "dpo", "rm")


@dataclass
class AlignDataConfig:
    train: str                          # .jsonl | .json | manifest .yaml | shard path/brace pattern
    eval: str | None = None             # held-out records of the same kind (None: no held-out eval)
    split: str = "train"                # manifest split read for `train`
    eval_split: str = "val"             # manifest split read for `eval`
    datasets: list[str] = field(default_factory=list)  # manifest dataset names; empty: the whole split
    max_bad_fraction: float = 0.01      # unusable-record rate above which the run stops
    eval_limit: int = 0                 # at most this many held-out records (0: all)

    def __post_init__(self):
        if not 0 <= self.max_bad_fraction < 1:
            raise ConfigError("data.max_bad_fraction must be in [0, 1)")


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


@dataclass
class AlignConfig:
    name: str
    method: Literal["sft", "dpo", "rm"]
    init_from: str
    data: AlignDataConfig
    steps: int
    trainable: list[str] = field(default_factory=lambda: ["llm.*"])
    model_overrides: list[str] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False  # recompute LLM (and vision-tower) activations in backward
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval_interval: int = 0              # steps between held-out evaluations (0: before and after training only)
    seed: int = 0
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    rm: RMSection = field(default_factory=RMSection)

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")
        if not self.trainable:
            raise ConfigError("trainable: list at least one parameter glob (e.g. 'llm.*')")
        if self.method != "sft" and self.batch.tokens_per_pack:
            raise ConfigError(f"batch.tokens_per_pack: packing is for sft; {self.method} compares whole sequences")


def load_align_config(path: str | Path, overrides: list[str] = ()) -> AlignConfig:
    return load_config(AlignConfig, path, overrides)

"""Stage and schedule configs: a stage is data (YAML), not code.

Stages differ only by these fields: what trains (globs), with which objective (`method`: sft,
dpo, rm — omni/align/objectives/), on which data, for how long, with which optimiser settings.
The omni stages and the align runs (omni/align/configs) are the same kind of config, run by the
same trainer. `stages/7b/*.yaml` and `stages/tiny/*.yaml` are twins with the same keys;
`tests/unit/test_configs.py` loads every one of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omni.align.config import DPOSection, RMSection, SFTSection
from omni.align.objectives import OBJECTIVES
from omni.config import ConfigError, from_dict, load_config
from omni.data.config import DataConfig
from omni.presets import PRESETS
from omni.train.engines import ENGINES, ZERO_STAGES
from omni.train.lora import LoraSection
from omni.train.qlora import check_qlora
from omni.train.optim import OptimConfig
from omni.train.trackers import check_trackers


@dataclass
class BatchConfig:
    micro_batch: int = 8                # samples per forward/backward
    grad_accum: int = 1                 # micro-batches per optimizer step
    tokens_per_pack: int = 0            # > 0: each micro-batch in one padding-free row, planned at this many tokens

    def __post_init__(self):
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ConfigError("batch.micro_batch and batch.grad_accum must be >= 1")
        if self.tokens_per_pack < 0:
            raise ConfigError("batch.tokens_per_pack must be >= 0 (0: no packing)")


@dataclass
class CheckpointConfig:
    interval: int = 0                   # steps between resumable checkpoints; 0: only the final model
    keep: int = 2                       # newest resumable checkpoints kept


@dataclass
class LogConfig:
    interval: int = 10                  # steps between console/JSONL metric lines
    profile: bool = False               # add tokens, tokens/s, model TFLOP/s and MFU to the metrics (omni/train/flops.py)
    peak_tflops: float = 0.0            # per-device peak for MFU; 0: look the GPU up by name (none on CPU)
    samples: bool = False               # samples.jsonl: every step's raw samples (position, key and shard)
    trackers: list[str] = field(default_factory=list)  # also log to tensorboard, wandb (omni/train/trackers.py)

    def __post_init__(self):
        if self.interval < 1:
            raise ConfigError("log.interval must be >= 1")
        if self.peak_tflops < 0:
            raise ConfigError("log.peak_tflops must be >= 0 (0: from the GPU's name)")
        check_trackers(self.trackers)


@dataclass
class StageConfig:
    name: str
    trainable: list[str]                # globs over parameter names, e.g. "projectors.image.*" (trained fully)
    data: DataConfig
    steps: int
    method: str = "sft"                 # the objective, a name of omni/align/objectives OBJECTIVES; its section below
    preset: str | None = None           # model preset "tiny", "small" or "7b" (omni.presets), when not init_from
    init_from: str | None = None        # "previous" (schedule fills it), a model dir, or None: preset init
    model_overrides: list[str] = field(default_factory=list)  # dotted key=value on the model config
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    engine: str = "ddp"                 # a name of omni/train/engines.py ENGINES; all run under torchrun
    zero_stage: int | None = None       # deepspeed only: 2 (shard grads + optimizer) or 3 (also weights)
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False  # recompute LLM, vision- and audio-tower activations in backward
    compile: bool = False               # torch.compile each LLM decoder layer and tower block (OmniModel.compile_blocks)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval_interval: int = 0              # steps between held-out evaluations (0: before and after training only)
    seed: int = 0
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    rm: RMSection = field(default_factory=RMSection)
    lora: LoraSection = field(default_factory=LoraSection)  # adapters on the layers lora.targets names (omni/train/lora.py)

    def __post_init__(self):
        if self.method not in OBJECTIVES:
            raise ConfigError(f"method: {self.method!r} is not an objective; choose one of {list(OBJECTIVES)}")
        if self.preset is None and self.init_from is None:
            raise ConfigError("give preset (tiny, small or 7b: a fresh model) or init_from (a model folder) to start from")
        if self.preset is not None and self.preset not in PRESETS:  # checked even when init_from wins
            raise ConfigError(f"preset: {self.preset!r} is unknown; choose one of {list(PRESETS)}")
        if self.method != "sft" and self.batch.tokens_per_pack:
            raise ConfigError(f"batch.tokens_per_pack: packing is for sft; {self.method} compares whole sequences")
        if self.method == "dpo" and self.dpo.precompute_ref and self.data.records is None:
            raise ConfigError("dpo.precompute_ref scores every pair once, so it needs data.records (a finite set); "
                              "for a streamed manifest set dpo.precompute_ref: false")
        if self.eval_interval < 0:
            raise ConfigError("eval_interval must be >= 0")
        if not self.trainable and not self.lora.enabled:
            raise ConfigError("trainable: list at least one parameter glob (e.g. 'projectors.*'), or set lora.rank")
        if self.lora.enabled and self.method == "rm":
            raise ConfigError("lora: method rm trains a reward wrapper; LoRA runs with method sft or dpo")
        if self.lora.qlora:
            check_qlora(self.engine)
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: {self.engine!r} is not available; choose one of {list(ENGINES)}")
        if self.engine == "deepspeed" and self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"zero_stage: engine deepspeed needs zero_stage {' or '.join(map(str, ZERO_STAGES))}, "
                              f"got {self.zero_stage!r}")
        if self.engine != "deepspeed" and self.zero_stage is not None:
            raise ConfigError(f"zero_stage: only engine deepspeed has ZeRO stages; drop it for engine {self.engine} "
                              "(fsdp2 shards like ZeRO-3)")


@dataclass
class SpeechEvalStep:
    """A schedule step between stages that scores the model's spoken answers (omni/speech_guard.py) and
    stops the schedule when they fall below `min_spoken` or more than `max_drop` below the score of the
    last speech_out stage before it: a thinker stage can break a talker it never touched."""
    datasets: list[str]                 # held-out sets (with spoken answers) of the speech_out stage's manifest
    min_spoken: float | None = None     # lowest spoken accuracy allowed on each dataset
    max_drop: float | None = None       # largest fall allowed below the score after the last speech_out stage
    limit: int = 48                     # held-out samples per dataset

    def __post_init__(self):
        if not self.datasets:
            raise ConfigError("datasets: list at least one dataset to score")
        if self.min_spoken is None and self.max_drop is None:
            raise ConfigError("give min_spoken, max_drop or both (spoken accuracy, 0..1)")
        for key in ("min_spoken", "max_drop"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}: {value} is not an accuracy between 0 and 1")
        if self.limit < 1:
            raise ConfigError(f"limit: {self.limit} must be at least 1")


@dataclass
class ScheduleStep:
    """A non-training entry of a schedule's `stages:` list (its one key names its kind)."""
    speech_eval: SpeechEvalStep


@dataclass
class ScheduleConfig:
    name: str
    # in order: stage YAML paths (relative to the schedule file) and steps such as {speech_eval: {...}}
    stages: list[str | dict]

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: list at least one stage file")
        self.stages = [s if isinstance(s, str) else _step(s, f"stages[{i}]") for i, s in enumerate(self.stages)]
        if not isinstance(self.stages[0], str):
            raise ConfigError("stages[0]: a schedule starts with a stage file (a step checks the stage before it)")


def _step(entry: dict, where: str) -> SpeechEvalStep:
    try:
        return from_dict(ScheduleStep, entry, where).speech_eval
    except ConfigError as e:  # a step's own checks name their key, not where the step is
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}.speech_eval: {e}") from None


def load_stage(path: str | Path, overrides: list[str] = ()) -> StageConfig:
    return load_config(StageConfig, path, overrides)


def load_schedule(path: str | Path) -> tuple[ScheduleConfig, list[Path]]:
    """The schedule and its stage files (in order, without its steps) resolved against its folder."""
    path = Path(path)
    sched = load_config(ScheduleConfig, path)
    files = [(path.parent / s) for s in sched.stages if isinstance(s, str)]
    for f in files:
        if not f.is_file():
            raise ConfigError(f"{path}: stage file {f} does not exist")
    return sched, files

"""The `data:` section of a stage config: where a stage's samples come from and how ranks share them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from omni.config import ConfigError


@dataclass
class DataConfig:
    """Training data is one of: `manifest`, a WebDataset mixture streamed by weight (the omni
    stages), or `records`, a record set read once into memory and shuffled per epoch (align runs:
    a .jsonl / .json file, a manifest's split or a shard pattern; omni/data/records.py). `eval`
    names held-out records of the same kind, scored by the objective before, during and after."""
    manifest: str | None = None         # data_manifests-style YAML (urls relative to it)
    records: str | None = None          # .jsonl | .json | manifest .yaml | shard path/brace pattern ($VARS expanded)
    datasets: dict[str, float] = field(default_factory=dict)  # name -> weight; empty: whole split
    split: str = "train"
    shuffle_buffer: int = 500
    max_bad_fraction: float = 0.01      # skipped-sample rate above which training stops
    # how ranks share the data (docs/data.md): "sample" = every rank reads one seeded stream and keeps
    # every world-th sample (N processes == 1 process exactly); "shard" = each rank and decode worker
    # reads its own shards (webdataset's node/worker split: I/O scales with the ranks)
    partition: Literal["sample", "shard"] = "sample"
    workers: int = 0                    # partition shard: DataLoader decode processes per rank (0: decode inline)
    resample: bool = True               # partition shard: endless resampled mixture; false: epochs over each
                                        # dataset's shards, split by node and worker, reshuffled per epoch
    prefetch: int = 2                   # micro-batches made ahead in a background thread while the step runs
                                        # (0: each made when the step asks); the same items in the same order

    eval: str | None = None             # held-out records (same sources as `records`); None: no held-out eval
    eval_split: str = "val"             # manifest split read for `eval`
    eval_limit: int = 0                 # at most this many held-out records (0: all)

    def __post_init__(self):
        if (self.manifest is None) == (self.records is None):
            raise ConfigError("data: give exactly one of manifest (a streamed WebDataset mixture) or records "
                              "(a .jsonl/.json/shard record set read into memory)")
        if self.records is not None and self.partition != "sample":
            raise ConfigError("data.partition: shard splits a manifest's shards; data.records are in memory")
        if self.eval_limit < 0:
            raise ConfigError("data.eval_limit must be >= 0 (0: all)")
        if any(w <= 0 for w in self.datasets.values()):
            raise ConfigError(f"data.datasets: weights must be > 0, got {self.datasets}")
        if self.prefetch < 0:
            raise ConfigError("data.prefetch must be >= 0 (0: make each micro-batch when the step asks)")
        if self.workers < 0:
            raise ConfigError("data.workers must be >= 0")
        if self.partition != "shard" and (self.workers or not self.resample):
            raise ConfigError("data.workers and data.resample: false need data.partition: shard "
                              "(partition sample reads one shared stream in the training process)")
        if not 0 <= self.max_bad_fraction < 1:
            raise ConfigError("data.max_bad_fraction must be in [0, 1)")

"""Dataset manifests: YAML lists of WebDataset shard sets with sizes, weights and modalities."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omni.config import ConfigError, load_config
from omni.modalities import MODALITIES

ALLOW_PIPE_ENV = "OMNI_ALLOW_PIPE"


@dataclass
class DatasetEntry:
    name: str
    urls: str                           # brace pattern; local paths are relative to the manifest
    num_samples: int
    weight: float = 1.0                 # mixture weight
    modalities: list[str] = field(default_factory=list)
    split: str = "train"
    task: str | None = None

    def __post_init__(self):
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ConfigError(f"dataset {self.name}: unknown modalities {bad}; known: {list(MODALITIES)}")
        if self.weight <= 0 or self.num_samples < 0:
            raise ConfigError(f"dataset {self.name}: weight must be > 0 and num_samples >= 0")


@dataclass
class Manifest:
    name: str
    datasets: list[DatasetEntry]
    allow_pipe: bool = False            # urls may be `pipe:COMMAND` (runs COMMAND in a shell): trust it first

    def select(self, split: str, names: list[str] | None = None) -> list[DatasetEntry]:
        """Entries of `split`, optionally only `names` (error naming what is missing)."""
        entries = [d for d in self.datasets if d.split == split]
        if names:
            by_name = {d.name: d for d in entries}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ConfigError(
                    f"manifest {self.name}: no {split!r} dataset(s) {missing}; available: {sorted(by_name)}"
                )
            entries = [by_name[n] for n in names]
        if not entries:
            raise ConfigError(f"manifest {self.name}: no datasets in split {split!r}")
        return entries


def _resolve(urls: str, base: Path) -> str:
    """Expand $VARS; make plain local paths absolute against the manifest's folder."""
    urls = os.path.expandvars(urls)
    if "://" in urls or urls.startswith("pipe:") or os.path.isabs(urls):
        return urls
    return str((base / urls).resolve())


def load_manifest(path: str | Path) -> Manifest:
    """The manifest with local urls made absolute. `pipe:` urls run a shell command for every shard,
    so they are refused unless the manifest says `allow_pipe: true` or the environment sets
    OMNI_ALLOW_PIPE=1; webdataset's own schemes (http(s)://, s3://, gs://, ...) need no opt-in."""
    path = Path(path)
    manifest = load_config(Manifest, path)
    trusted = manifest.allow_pipe or os.environ.get(ALLOW_PIPE_ENV) == "1"
    for d in manifest.datasets:
        d.urls = _resolve(d.urls, path.parent)
        if d.urls.startswith("pipe:") and not trusted:
            raise ConfigError(f"{path}: dataset {d.name}: urls {d.urls!r} run a shell command; if you trust this "
                              f"manifest, add `allow_pipe: true` at its top (or set {ALLOW_PIPE_ENV}=1)")
    return manifest

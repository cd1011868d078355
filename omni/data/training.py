"""What a stage trains and scores on, from its `data:` section (DataConfig): in-memory records, held-out
records, and the one function that builds this rank's training Stream (omni/data/stream.py)."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from omni.data.config import DataConfig
from omni.data.loader import SkipCounter
from omni.data.manifest import load_manifest
from omni.data.records import read_records, record_from_raw
from omni.data.sharded import ShardStream
from omni.data.stream import MixtureStream, RecordStream, Stream


def _read(data: DataConfig, spec: str, split: str) -> list[dict]:
    return read_records(spec, split, list(data.datasets) or None)


def training_records(data: DataConfig) -> list[dict] | None:
    """`data.records` read into memory; None when the stage streams a manifest."""
    return _read(data, data.records, data.split) if data.records else None


def held_out(data: DataConfig) -> list[dict]:
    """The records the objective scores before, during and after training."""
    if data.eval is None:
        return []
    evals = _read(data, data.eval, data.eval_split)
    return evals[:data.eval_limit] if data.eval_limit else evals


def training_stream(data: DataConfig, records: list[dict] | None, seed: int, make: Callable[[dict], Any],
                    counter: SkipCounter, rank: int = 0, world_size: int = 1) -> Stream:
    """This rank's training items: `records` (from `training_records`) in seeded epochs, or the
    manifest's weighted WebDataset mixture split by sample or by shard (`data.partition`;
    docs/data.md). Either way every sample becomes a record and `make(record)` makes the item."""
    if records is not None:
        return RecordStream(records, seed, make, counter, rank=rank, world_size=world_size)
    entries = load_manifest(data.manifest).select(data.split, list(data.datasets) or None)
    weights = [data.datasets.get(e.name, e.weight) for e in entries]
    make_sample = partial(_make_sample, make)
    if data.partition == "sample":
        return MixtureStream(entries, weights, seed, data.shuffle_buffer, make_sample, counter, rank=rank,
                             world_size=world_size)
    return ShardStream(entries, weights, seed=seed, shuffle_buffer=data.shuffle_buffer, resample=data.resample,
                       make=make_sample, counter=counter, rank=rank, world_size=world_size, workers=data.workers)


def _make_sample(make: Callable[[dict], Any], sample: dict):
    """A WebDataset sample -> its record -> the item (module level: decode workers run it)."""
    return make(record_from_raw(sample))

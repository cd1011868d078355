"""A stage's training items: one `Stream` interface for every data source, and the streams that
read in the training process.

A stream hands out this rank's next k good items (`take`), counting the raw samples it consumed
(good and bad) in `consumed`; a bad sample (its `make` raises) is skipped, counted in the stage's
SkipCounter and named. `state()` is this rank's position for a checkpoint and `restore(state)`,
before the first take, continues exactly there. Kinds (omni/data/training.py picks one):

    RecordStream    in-memory records (`data.records`) in seeded epochs; position: records consumed
    MixtureStream   a manifest's weighted WebDataset mixture, `data.partition: sample`; position:
                    raw samples consumed
    ShardStream     the same mixture, `data.partition: shard` (omni/data/sharded.py); position: a dict
                    of what each decode worker consumed

The first two read one sequence that every rank walks in the same order, each keeping every
world-th item from offset `rank`, so N processes see exactly what one would (docs/data.md).
"""
from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import webdataset as wds

from omni.config import ConfigError
from omni.data.loader import SkipCounter, where
from omni.data.manifest import DatasetEntry
from omni.data.records import AlignDataError


class Stream(ABC):
    """This rank's training items; the trainer only uses this interface."""

    @property
    @abstractmethod
    def consumed(self) -> int:
        """Raw samples (records) this rank has taken, good and bad, for metrics."""

    @abstractmethod
    def take(self, k: int) -> list:
        """The next k good items."""

    @abstractmethod
    def state(self):
        """This rank's position for a checkpoint (picklable)."""

    @abstractmethod
    def restore(self, state) -> None:
        """Continue from `state()` of an earlier run of the same configuration (before the first take)."""


class SequentialStream(Stream):
    """Items made by `make(sample)` from one endless sequence of samples read in the training
    process; the position is how many samples were consumed, so a resume passes over that many
    without making them."""

    def __init__(self, samples: Iterator, make: Callable[[Any], Any], counter: SkipCounter):
        self.samples, self.make, self.counter = samples, make, counter
        self._consumed = 0

    @property
    def consumed(self) -> int:
        return self._consumed

    def take(self, k: int) -> list:
        out = []
        while len(out) < k:
            sample = next(self.samples)
            self._consumed += 1
            try:
                out.append(self.make(sample))
            except Exception as e:  # noqa: BLE001 - counted, reported with key+shard, rate-limited
                self.counter.skip(where(sample), e)
                continue
            self.counter.ok()
        return out

    def state(self) -> int:
        return self._consumed

    def restore(self, state: int) -> None:
        if not isinstance(state, int):
            raise ConfigError(f"the checkpoint's data position {state!r} was written by data.partition: shard; "
                              "resume with data.partition: shard (as when it was written)")
        for _ in range(state):
            next(self.samples)
            self._consumed += 1


class RecordStream(SequentialStream):
    """In-memory records in endless seeded epochs (each a fresh permutation)."""

    def __init__(self, records: list, seed: int, make: Callable[[Any], Any], counter: SkipCounter,
                 rank: int = 0, world_size: int = 1):
        if not records:
            raise AlignDataError("no training records")
        super().__init__(_epochs(records, seed, rank, world_size), make, counter)


def _epochs(records: list, seed: int, rank: int, world_size: int) -> Iterator:
    n = 0
    for epoch in itertools.count():
        order = list(range(len(records)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for i in order:
            if n % world_size == rank:
                yield records[i]
            n += 1


class MixtureStream(SequentialStream):
    """Raw WebDataset samples of the manifest's datasets, mixed by weight: each dataset read as
    resampled shards (webdataset's ResampledShards, so it never ends), shuffled in a buffer;
    deterministic for a given seed. Every rank draws the same sequence (undecoded members of
    other ranks' samples are cheap to pass over)."""

    def __init__(self, entries: list[DatasetEntry], weights: list[float], seed: int, shuffle_buffer: int,
                 make: Callable[[dict], Any], counter: SkipCounter, rank: int = 0, world_size: int = 1):
        samples = mixture_samples(entries, weights, seed, shuffle_buffer, counter.handler)
        super().__init__(itertools.islice(samples, rank, None, world_size), make, counter)


class DryShards:
    """Resampling draws shards forever, so a dataset whose shards hold no sample (empty or unreadable
    tars) would spin without a word: after `limit` shard draws in a row without a sample it stops the
    run with a ConfigError naming the dataset and the last shard. Two pipeline stages share it, one
    after the shard list and one after the tar reader; neither changes the sample sequence."""

    def __init__(self, entry: DatasetEntry):
        self.name, self.dry, self.last = entry.name, 0, "?"
        self.limit = 50 + 2 * len(wds.shardlists.expand_urls(entry.urls))

    def shards(self, src: Iterator[dict]) -> Iterator[dict]:
        for shard in src:
            self.dry += 1
            self.last = shard.get("url", "?")
            if self.dry > self.limit:
                raise ConfigError(f"dataset {self.name}: {self.limit} shard reads in a row gave no sample "
                                  f"(last: {self.last}); its shards are empty or unreadable: fix the manifest's urls")
            yield shard

    def samples(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            self.dry = 0
            yield sample


def mixture_samples(entries: list[DatasetEntry], weights: list[float], seed: int, shuffle_buffer: int,
                    handler) -> Iterator[dict]:
    """Endless raw samples of all ranks together (MixtureStream's sequence before the rank's share);
    `handler`: webdataset's, for corrupt shards and members."""
    pipes = []
    for i, entry in enumerate(entries):
        dry = DryShards(entry)
        pipes.append(wds.DataPipeline(
            # worker_seed: the same shard sequence on every rank (ranks stride over it)
            wds.ResampledShards(entry.urls, seed=seed * 1000 + i, deterministic=True, worker_seed=lambda: 0),
            dry.shards,
            wds.tarfile_to_samples(handler=handler),
            dry.samples,
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed * 1000 + i)),
        ))
    return mix_by_weight([iter(p) for p in pipes], weights, random.Random(seed))


def mix_by_weight(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Endless samples, each from a stream drawn by weight with `rng` (wds.RandomMix draws from the
    global `random`, so it could not be seeded per stream)."""
    total = sum(weights)
    probs = [w / total for w in weights]
    while True:
        yield next(streams[rng.choices(range(len(streams)), probs)[0]])

"""A stage's training items: one `Stream` interface for every data source, and the streams that
read in the training process.

A stream hands out this rank's next k good items (`take`), counting the raw samples it consumed
(good and bad) in `consumed`; a bad sample (its `make` raises) is skipped, counted in the stage's
SkipCounter and named. `taken()` names the samples consumed since it was last called (for the
per-step samples log). `state()` is this rank's position for a checkpoint and `restore(states)`,
given every rank's `state()`, continues exactly there before the first take. Kinds
(omni/data/training.py picks one):

    RecordStream    in-memory records (`data.records`) in seeded epochs
    MixtureStream   a manifest's weighted WebDataset mixture, `data.partition: sample`
    ShardStream     the same mixture, `data.partition: shard` (omni/data/sharded.py); position: a dict
                    of what each decode worker consumed, on the same number of processes only

The first two read one sequence that every rank walks in the same order, each keeping the samples
at positions n with n % world == rank, so N processes see exactly what one would; their position
(`SequentialStream.state`) says which positions of that sequence are consumed, so a resume may
re-split the rest over another number of processes (docs/data.md).
"""
from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import webdataset as wds

from omni.config import ConfigError
from omni.data.loader import SkipCounter, where
from omni.data.manifest import DatasetEntry
from omni.data.records import AlignDataError
from omni.data.tar_index import load, tar_samples


class Stream(ABC):
    """This rank's training items; the trainer only uses this interface."""

    @property
    @abstractmethod
    def consumed(self) -> int:
        """Raw samples (records) this rank has taken, good and bad, for metrics (summed over ranks)."""

    @abstractmethod
    def take(self, k: int) -> list:
        """The next k good items."""

    @abstractmethod
    def taken(self) -> list[tuple[int | None, str]]:
        """(position in the shared sequence or None, key and shard) of every raw sample consumed
        since the last call, in order; clears the list."""

    @abstractmethod
    def state(self):
        """This rank's position for a checkpoint (picklable)."""

    @abstractmethod
    def restore(self, states: list) -> None:
        """Continue from every rank's `state()` of an earlier run of the same configuration, in rank
        order (before the first take)."""


class SequentialStream(Stream):
    """Items made by `make(sample)` from one endless sequence of samples that every rank reads in the
    training process; rank r of W consumes the positions n with n % W == r and passes over the rest
    without making them.

    Position: everything before `frontier` and the positions in `done` were consumed before the
    run this one resumes (none for a fresh run), and this rank consumed its own positions from
    `frontier` up to `next`. `merged_position` turns every rank's position into one (frontier,
    done) that holds for any number of processes: a resume passes over the first `frontier` samples
    and never consumes a position in `done`, so no sample is trained on twice or left out."""

    def __init__(self, samples: Callable[[int], Iterator], make: Callable[[Any], Any], counter: SkipCounter,
                 rank: int = 0, world_size: int = 1):
        """`samples(start)`: the sequence from position `start` on (a resume starts past its frontier)."""
        self.samples_from, self.make, self.counter = samples, make, counter
        self.samples: Iterator | None = None
        self.rank, self.world_size = rank, world_size
        self._read = 0                                  # positions read from `samples`
        self._frontier, self._done = 0, frozenset()     # consumed before the run this one resumes
        self._next = 0                                  # one past the last position this rank consumed
        self._consumed = 0
        self._taken: list[tuple[int, str]] = []

    @property
    def consumed(self) -> int:
        return self._consumed

    def _mine(self, n: int) -> bool:
        return n % self.world_size == self.rank and n >= self._frontier and n not in self._done

    def take(self, k: int) -> list:
        if self.samples is None:
            self.samples = self.samples_from(self._read)
        out = []
        while len(out) < k:
            n, sample = self._read, next(self.samples)
            self._read += 1
            if not self._mine(n):
                continue
            self._consumed += 1
            self._next = n + 1
            self._taken.append((n, where(sample) if isinstance(sample, dict) else repr(sample)))
            try:
                out.append(self.make(sample))
            except Exception as e:  # noqa: BLE001 - counted, reported with key+shard, rate-limited
                self.counter.skip(where(sample), e)
                continue
            self.counter.ok()
        return out

    def taken(self) -> list[tuple[int, str]]:
        out, self._taken = self._taken, []
        return out

    def state(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "frontier": self._frontier,
                "done": sorted(self._done), "next": max(self._next, self._frontier)}

    def restore(self, states: list) -> None:
        if self.samples is not None:
            raise RuntimeError("SequentialStream.restore must come before the first take")
        frontier, done = merged_position(states)
        self._frontier, self._done, self._next = frontier, frozenset(done), frontier
        self._read = frontier
        self.samples = self.samples_from(frontier)  # here: read errors passed over fall in counter.replaying
        # what the ranks consumed before counts once, on rank 0: the metrics' sum stays right
        self._consumed = frontier + len(done) if self.rank == 0 else 0


def merged_position(states: list) -> tuple[int, list[int]]:
    """Every rank's `SequentialStream.state()` (in rank order) -> (frontier, done): all positions
    before `frontier` and those in `done` (sorted, each >= frontier) are consumed, no other. Ranks
    that skipped different numbers of bad samples consumed different counts, so the consumed
    positions need not be a prefix; `done` holds the few beyond the first gap. Checkpoints of
    earlier versions hold an int per rank: how many of its positions the rank consumed."""
    if not states or not all(isinstance(s, (int, dict)) and not (isinstance(s, dict) and "workers" in s)
                             for s in states):
        raise ConfigError("the checkpoint's data position was written by data.partition: shard; "
                          "resume with data.partition: shard (as when it was written)")
    world = len(states)
    states = [{"world_size": world, "rank": r, "frontier": 0, "done": [], "next": r + s * world}
              if isinstance(s, int) else s for r, s in enumerate(states)]
    if [(s["world_size"], s["rank"]) for s in states] != [(world, r) for r in range(world)]:
        raise ConfigError(f"the checkpoint's data positions are not one per rank of {world} process(es); "
                          "the checkpoint is damaged: remove it to resume from an earlier one")
    frontier, done = states[0]["frontier"], set(states[0]["done"])
    nexts = [max(s["next"], frontier) for s in states]

    def first_after(r: int, n: int) -> int:
        """Rank r's first position >= n."""
        return n + (r - n) % world

    def first_open(r: int) -> int:
        p = first_after(r, nexts[r])
        while p in done:
            p += world
        return p

    new_frontier = min(first_open(r) for r in range(world))
    consumed_past = {p for r in range(world) for p in range(first_after(r, new_frontier), nexts[r], world)}
    return new_frontier, sorted(consumed_past | {d for d in done if d >= new_frontier})


class RecordStream(SequentialStream):
    """In-memory records in endless seeded epochs (each a fresh permutation)."""

    def __init__(self, records: list, seed: int, make: Callable[[Any], Any], counter: SkipCounter,
                 rank: int = 0, world_size: int = 1):
        if not records:
            raise AlignDataError("no training records")
        super().__init__(partial(_epochs, records, seed), make, counter, rank, world_size)


def _epochs(records: list, seed: int, start: int = 0) -> Iterator:
    """The records in endless seeded epochs from position `start`: a seek (the epoch's permutation
    is drawn again, nothing before `start` is read), so a resume costs the same at any step."""
    first, skip = divmod(start, len(records))
    for epoch in itertools.count(first):
        order = list(range(len(records)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        yield from (records[i] for i in order[skip:])
        skip = 0


class MixtureStream(SequentialStream):
    """Raw WebDataset samples of the manifest's datasets, mixed by weight: each dataset read as
    resampled shards (webdataset's ResampledShards, so it never ends), shuffled in a buffer;
    deterministic for a given seed. Every rank draws the same sequence of sample references
    (omni/data/tar_index.py) and reads the bytes of its own samples only, so passing over other
    ranks' samples, or a resume's consumed ones, reads no tar data: a resume draws the same
    shards, shuffles and mixture picks up to its position (RNG draws, no reads) and goes on."""

    def __init__(self, entries: list[DatasetEntry], weights: list[float], seed: int, shuffle_buffer: int,
                 make: Callable[[dict], Any], counter: SkipCounter, rank: int = 0, world_size: int = 1):
        def samples(start: int) -> Iterator[dict]:
            out = mixture_samples(entries, weights, seed, shuffle_buffer, counter.handler)
            for _ in range(start):
                next(out)
            return out

        super().__init__(samples, lambda sample: make(load(sample)), counter, rank, world_size)


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
            tar_samples(handler),
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

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

A manifest stream's position also holds its reading pipeline's state (omni/data/pipeline.py), so a
resume seeks there instead of drawing every consumed sample again.

The first two read one sequence that every rank walks in the same order, each keeping the samples
at positions n with n % world == rank, so N processes see exactly what one would; their position
(`SequentialStream.state`) says which positions of that sequence are consumed, so a resume may
re-split the rest over another number of processes (docs/data.md).
"""
from __future__ import annotations

import itertools
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

from omni.config import ConfigError
from omni.data.loader import SkipCounter, where
from omni.data.manifest import DatasetEntry
from omni.data.pipeline import DryShards, Mixer, Reader, Resampled
from omni.data.records import AlignDataError
from omni.data.tar_index import load

log = logging.getLogger(__name__)


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
    and never consumes a position in `done`, so no sample is trained on twice or left out. A kind
    whose reader has a state also saves it, at the `read` samples this rank has read (`reader`): a
    resume sets the latest one at or before its frontier instead of reading from the start."""

    def __init__(self, make: Callable[[Any], Any], counter: SkipCounter, rank: int = 0, world_size: int = 1):
        self.make, self.counter = make, counter
        self.samples: Iterator | None = None
        self.rank, self.world_size = rank, world_size
        self._read = 0                                  # positions read from `samples`
        self._frontier, self._done = 0, frozenset()     # consumed before the run this one resumes
        self._next = 0                                  # one past the last position this rank consumed
        self._consumed = 0
        self._taken: list[tuple[int, str]] = []

    @abstractmethod
    def _open(self, start: int, saved: list[tuple[int, Any]]) -> Iterator:
        """The sequence from position `start` on; `saved`: (position, reader state) pairs of a checkpoint."""

    def _reader_state(self) -> Any:
        """The reader's state after the `_read` samples read so far (None: this kind has none)."""
        return None

    @property
    def consumed(self) -> int:
        return self._consumed

    def _mine(self, n: int) -> bool:
        return n % self.world_size == self.rank and n >= self._frontier and n not in self._done

    def take(self, k: int) -> list:
        if self.samples is None:
            self.samples = self._open(self._read, [])
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
        state = {"world_size": self.world_size, "rank": self.rank, "frontier": self._frontier,
                 "done": sorted(self._done), "next": max(self._next, self._frontier)}
        reader = self._reader_state() if self.samples is not None else None
        if reader is not None:
            state["reader"] = {"read": self._read, "state": reader}
        return state

    def restore(self, states: list) -> None:
        if self.samples is not None:
            raise RuntimeError("SequentialStream.restore must come before the first take")
        frontier, done = merged_position(states)
        self._frontier, self._done, self._next = frontier, frozenset(done), frontier
        self._read = frontier
        saved = [(s["reader"]["read"], s["reader"]["state"]) for s in states if isinstance(s, dict) and "reader" in s]
        self.samples = self._open(frontier, saved)  # here: read errors passed over fall in counter.replaying
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
        super().__init__(make, counter, rank, world_size)
        self.records, self.seed = records, seed

    def _open(self, start: int, saved: list[tuple[int, Any]]) -> Iterator:
        return _epochs(self.records, self.seed, start)


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
    resampled shards (never ending), shuffled in a buffer; deterministic for a given seed
    (omni/data/pipeline.py). Every rank draws the same sequence of sample references
    (omni/data/tar_index.py) and reads the bytes of its own samples only. A resume sets the
    pipeline's saved state (RNGs, shard cursors, buffers of references) of the latest position at
    or before its frontier and draws the few samples from there to it (a seek: the same cost at any
    step); without a saved state (a checkpoint written before, or a dataset webdataset reads with
    the bytes: remote, `pipe:`, .tar.gz) it draws every sample before the frontier (a replay)."""

    def __init__(self, entries: list[DatasetEntry], weights: list[float], seed: int, shuffle_buffer: int,
                 make: Callable[[dict], Any], counter: SkipCounter, rank: int = 0, world_size: int = 1):
        super().__init__(lambda sample: make(load(sample)), counter, rank, world_size)
        self.entries, self.weights, self.seed, self.shuffle_buffer = entries, weights, seed, shuffle_buffer

    def _open(self, start: int, saved: list[tuple[int, Any]]) -> Mixer:
        mixer = mixture_samples(self.entries, self.weights, self.seed, self.shuffle_buffer, self.counter.handler)
        at = max((p for p, _ in saved if p <= start), default=None)
        if at is not None:
            mixer.set_state(next(s for p, s in saved if p == at))
        elif start:
            log.info("data: the checkpoint holds no pipeline state at or before position %d (%s); replaying: drawing "
                     "the %d samples before it again", start, "a dataset's shards are read with their bytes: remote, "
                     "pipe: or .tar.gz" if mixer.state() is None else "written without one", start)
        mixer.skip(start - (at or 0))
        return mixer

    def _reader_state(self) -> Any:
        return self.samples.state()


def mixture_samples(entries: list[DatasetEntry], weights: list[float], seed: int, shuffle_buffer: int,
                    handler) -> Mixer:
    """Endless raw samples of all ranks together (MixtureStream's sequence before the rank's share);
    `handler`: webdataset's, for corrupt shards and members."""
    readers = [Reader(Resampled(entry.urls, seed * 1000 + i), shuffle_buffer, random.Random(seed * 1000 + i), handler,
                      DryShards(entry))
               for i, entry in enumerate(entries)]
    return Mixer(readers, weights, random.Random(seed))

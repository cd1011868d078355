"""data.partition: shard — every rank and every decode worker reads its own shards (docs/data.md).

A *logical worker* is a (rank, role) pair, `role` one of the rank's max(workers, 1) roles. It reads
its own shards, shuffles them in a buffer and mixes the datasets by weight, each step drawn from an
RNG seeded by (seed, dataset, rank, role, epoch), so its raw sample sequence depends on the
configuration only. A checkpoint therefore holds just how many raw samples each logical worker
consumed (and whose turn is next); a resume draws those counts again as sample references, reading
no tar data (omni/data/tar_index.py), and reads the bytes of the samples after them.

With `workers > 0` the roles run in DataLoader processes that decode and `make` the items; torch
hands their items out round robin, in worker order. With `workers == 0` the single role runs inline.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni.config import ConfigError
from omni.data.loader import SkipCounter, where
from omni.data.manifest import DatasetEntry
from omni.data.stream import DryShards, Stream, mix_by_weight
from omni.data.tar_index import load, tar_samples
from omni.errors import SampleError


def seed_of(purpose: str, *parts: int) -> int:
    """A seed for `purpose` and these parts, the same in every process (unlike hash() of a str) and
    without webdataset's make_seed collisions (there (0, 31) and (1, 0) give one seed)."""
    key = repr((purpose, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def take_every(start: int, step: int) -> Callable[[Iterator], Iterator]:
    """Pipeline stage keeping every `step`-th shard from `start`: the slice wds.split_by_node and
    wds.split_by_worker take, with the rank and role given here. Theirs come from process state
    (RANK/WORLD_SIZE or torch.distributed; get_worker_info()), but after a resume a DataLoader worker
    plays another worker's role, and tests run several ranks in one process."""
    return lambda shards: itertools.islice(shards, start, None, step)


class Skips(list):
    """(where, why) of the bad samples and shard reads a logical worker met since its last item:
    they travel up with the next item, to the rank's SkipCounter in the main process."""

    def handler(self, exn: Exception) -> bool:
        """webdataset handler: a corrupt shard or member is noted and the stream goes on."""
        self.append(("shard read", str(exn)))
        return True

    def drain(self) -> list[tuple[str, str]]:
        out = list(self)
        self.clear()
        return out


@dataclass
class Item:
    """One raw sample of logical worker `role`: what `make` made of it (None: it was bad), the
    skips since the previous item and the sample's key and shard."""
    role: int
    made: Any
    skips: list[tuple[str, str]]
    where: str


def resampled_samples(entry: DatasetEntry, index: int, seed: int, shuffle_buffer: int, rank: int,
                      role: int, handler) -> Iterator[dict]:
    """Endless samples of one dataset from shards drawn with replacement by this logical worker."""
    dry = DryShards(entry)
    return iter(wds.DataPipeline(
        # the logical worker is in `seed`: the default worker_seed would use the DataLoader worker id
        wds.ResampledShards(entry.urls, seed=seed_of("shards", seed, index, rank, role), worker_seed=lambda: 0,
                            deterministic=True),
        dry.shards,
        tar_samples(handler),
        dry.samples,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                    rng=random.Random(seed_of("shuffle", seed, index, rank, role))),
    ))


def epoch_samples(entry: DatasetEntry, index: int, seed: int, shuffle_buffer: int, rank: int,
                  world_size: int, role: int, roles: int, handler) -> Iterator[dict]:
    """Endless epochs of one dataset. Each epoch's shard order depends on (seed, dataset, epoch)
    only, so all ranks agree on it and the logical workers together read every shard once."""
    for epoch in itertools.count():
        empty = True
        for sample in wds.DataPipeline(
            wds.SimpleShardList(entry.urls, seed=seed_of("epoch", seed, index, epoch)),
            take_every(rank, world_size),  # by node
            take_every(role, roles),       # by worker
            tar_samples(handler),
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                        rng=random.Random(seed_of("shuffle", seed, index, rank, role, epoch))),
        ):
            empty = False
            yield sample
        if empty:  # every later epoch would read the same nothing: stop instead of spinning
            raise RuntimeError(f"dataset {entry.name}: rank {rank} worker {role} read no sample in epoch {epoch}; "
                               "its shards are all empty or unreadable")


@dataclass(frozen=True)
class Readers:
    """This rank's logical workers: what each reads and how its samples become items. The main
    process (workers == 0) and the DataLoader workers run it; it holds no stream state, so the
    stream and its DataLoader form no reference cycle (collected by the cyclic GC instead of on
    the spot, a DataLoader shuts down only after a 5 s join timeout per worker)."""
    entries: list[DatasetEntry]
    weights: list[float]
    seed: int
    shuffle_buffer: int
    resample: bool
    make: Callable[[dict], Any]
    rank: int
    world_size: int
    roles: int

    def raw_samples(self, role: int, handler) -> Iterator[dict]:
        """Logical worker `role`'s endless raw samples: its datasets mixed by weight."""
        if self.resample:
            streams = [resampled_samples(e, i, self.seed, self.shuffle_buffer, self.rank, role, handler)
                       for i, e in enumerate(self.entries)]
        else:
            streams = [epoch_samples(e, i, self.seed, self.shuffle_buffer, self.rank, self.world_size, role,
                                     self.roles, handler) for i, e in enumerate(self.entries)]
        return mix_by_weight(streams, self.weights, random.Random(seed_of("mix", self.seed, self.rank, role)))

    def items(self, role: int, consumed: int) -> Iterator[Item]:
        """One Item per raw sample of logical worker `role`, after the `consumed` ones of a run it
        resumes (passed over as references: the same RNG draws, nothing read or made)."""
        skips = Skips()
        raw = self.raw_samples(role, skips.handler)
        for _ in range(consumed):
            next(raw)
        skips.clear()  # the read errors met before `consumed` were counted by the run that met them
        for sample in raw:
            made = None
            try:
                made = self.make(load(sample))
            except Exception as e:  # noqa: BLE001 - counted, reported with key+shard, rate-limited
                skips.append((where(sample), str(e)))
            yield Item(role, made, skips.drain(), where(sample))


class Roles(IterableDataset):
    """What the DataLoader's workers run. Worker w plays role (w + first) % roles: torch starts each
    DataLoader at worker 0, so after a resume the role whose turn was next goes first."""

    def __init__(self, readers: Readers, consumed: list[int], first: int):
        self.readers, self.consumed, self.first = readers, consumed, first

    def __iter__(self) -> Iterator[Item]:
        role = (get_worker_info().id + self.first) % self.readers.roles
        return self.readers.items(role, self.consumed[role])


class ShardStream(Stream):
    """This rank's training items, its logical workers' samples in round robin. `make(raw)` turns a raw WebDataset sample
    into an item and raises on a bad one (skipped, counted in `counter`, named by key and shard);
    for an exact resume its item may depend on the sample only, not on global RNGs."""

    def __init__(self, entries: list[DatasetEntry], weights: list[float], *, seed: int, shuffle_buffer: int,
                 resample: bool, make: Callable[[dict], Any], counter: SkipCounter, rank: int = 0,
                 world_size: int = 1, workers: int = 0):
        self.readers = Readers(entries, weights, seed, shuffle_buffer, resample, make, rank, world_size,
                               roles=max(workers, 1))
        self.counter, self.workers = counter, workers
        if not resample:
            self._check_enough_shards()
        self._consumed = [0] * self.readers.roles  # raw samples taken from each logical worker
        self._next = 0                             # the one the round robin hands out next
        self._items: Iterator[Item] | None = None
        self._taken: list[tuple[None, str]] = []

    def _check_enough_shards(self) -> None:
        """Epochs split shards, not samples: a logical worker without a shard would have nothing."""
        world_size, roles = self.readers.world_size, self.readers.roles
        for entry in self.readers.entries:
            have = len(wds.SimpleShardList(entry.urls))
            if have < world_size * roles:
                raise ConfigError(
                    f"dataset {entry.name}: {have} shard(s) ({entry.urls}) for {world_size} process(es) x {roles} "
                    f"decode worker(s) = {world_size * roles} readers; data.resample: false gives every reader its "
                    f"own shards, so write the dataset into >= {world_size * roles} shards, lower data.workers or "
                    "the number of processes, or set data.resample: true")

    @property
    def consumed(self) -> int:
        """Raw samples this rank has taken (good and bad), for metrics."""
        return sum(self._consumed)

    def _loader(self) -> DataLoader:
        # fork, not spawn: `make` holds the processor with the image tower and the tokenizer; fork
        # shares them copy-on-write and needs nothing picklable, spawn would pickle them into every
        # worker. The workers only make CPU tensors, so a parent that has initialised CUDA is fine.
        # Exact resume relies on in_order: items come out strictly in worker order. Its own generator:
        # starting the workers then draws nothing from the global torch RNG that training uses.
        seeds = torch.Generator().manual_seed(seed_of("loader", self.readers.seed, self.readers.rank))
        return DataLoader(Roles(self.readers, self._consumed, self._next), batch_size=None,
                          num_workers=self.workers, multiprocessing_context="fork", collate_fn=_as_is,
                          in_order=True, generator=seeds)

    def take(self, k: int) -> list:
        """The next k good items."""
        if self._items is None:
            self._items = self.readers.items(0, self._consumed[0]) if self.workers == 0 else iter(self._loader())
        out = []
        while len(out) < k:
            item = next(self._items)
            self._consumed[item.role] += 1
            self._next = (item.role + 1) % self.readers.roles
            self._taken.append((None, item.where))  # logical workers have no shared sequence to be placed in
            for place, why in item.skips:
                self.counter.skip(place, SampleError(why))
            if item.made is not None:
                self.counter.ok()
                out.append(item.made)
        return out

    def taken(self) -> list[tuple[None, str]]:
        out, self._taken = self._taken, []
        return out

    def state(self) -> dict:
        """This rank's position for a checkpoint. Items prefetched by the workers but not taken are
        not in it: after a resume they are read again."""
        return {"workers": self.workers, "consumed": list(self._consumed), "next": self._next}

    def restore(self, states: list) -> None:
        """Continue from every rank's `state()` of an earlier run of the same configuration (before the
        first take). Each rank read its own shards with its own RNGs, so the positions only hold for
        as many processes as wrote them."""
        if self._items is not None:
            raise RuntimeError("ShardStream.restore must come before the first take")
        if len(states) != self.readers.world_size:
            raise ConfigError(
                f"the checkpoint's data position was written by {len(states)} process(es) with data.partition: "
                f"shard, this run has {self.readers.world_size}: each rank read its own shards with its own RNGs, "
                f"so the position cannot be re-split; resume on {len(states)} process(es) (torchrun "
                f"--nproc_per_node {len(states)}), or train into a new --out folder (data.partition: sample "
                "resumes on any number of processes)")
        state = states[self.readers.rank]
        if not isinstance(state, dict) or "workers" not in state:
            raise ConfigError(f"the checkpoint's data position {state!r} was written by data.partition: sample; "
                              "resume with data.partition: sample (as when it was written)")
        if len(state["consumed"]) != self.readers.roles:
            raise ConfigError(
                f"the checkpoint's data position was written with data.workers={state['workers']}, this run has "
                f"data.workers={self.workers}: each decode worker reads its own shards with its own RNGs, so the "
                f"position only holds for the same count; resume with data.workers={state['workers']}")
        self._consumed, self._next = list(state["consumed"]), state["next"]


def _as_is(item: Item) -> Item:
    """collate_fn: items go to the main process as they are (the default would convert their contents)."""
    return item


"""data.partition: shard — every rank and every decode worker reads its own shards (docs/data.md).

A *logical worker* is a (rank, role) pair, `role` one of the rank's max(workers, 1) roles. It reads
its own shards, shuffles them in a buffer and mixes the datasets by weight, each step drawn from an
RNG seeded by (seed, dataset, rank, role, epoch), so its raw sample sequence depends on the
configuration only. A checkpoint holds how many raw samples each logical worker consumed, whose
turn is next, and each logical worker's pipeline state there (omni/data/pipeline.py: RNG states,
shard cursors, shuffle buffers as references); a resume sets those states (a seek) and reads the
bytes of the samples after them. Without a state (an older checkpoint, shards read with their
bytes) it draws the consumed samples again as references (a replay, reading no indexed tar data).

With `workers > 0` the roles run in DataLoader processes that decode and `make` the items; torch
hands their items out round robin, in worker order. With `workers == 0` the single role runs inline.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni.config import ConfigError
from omni.data.loader import SkipCounter, where
from omni.data.manifest import DatasetEntry
from omni.data.pipeline import DryShards, Epochs, EpochShards, Mixer, Reader, Resampled
from omni.data.stream import Stream
from omni.data.tar_index import load
from omni.errors import SampleError

log = logging.getLogger(__name__)
STATE_EVERY = 16  # a logical worker's items that carry its pipeline state: every 16th (a resume draws <= 15)


def seed_of(purpose: str, *parts: int) -> int:
    """A seed for `purpose` and these parts, the same in every process (unlike hash() of a str) and
    without webdataset's make_seed collisions (there (0, 31) and (1, 0) give one seed)."""
    key = repr((purpose, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


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
    state: list | None  # every STATE_EVERY-th item: [n, the pipeline state after it, its n-th sample]; else None


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

    def raw_samples(self, role: int, handler) -> Mixer:
        """Logical worker `role`'s endless raw samples: its datasets mixed by weight. Resampled: shards
        drawn with replacement by this logical worker; epochs: each epoch's shard order depends on
        (seed, dataset, epoch) only, so all ranks agree on it and the logical workers together read
        every shard once an epoch."""
        def epoch(entry: DatasetEntry, i: int, n: int) -> Reader:
            return Reader(EpochShards(entry.urls, seed_of("epoch", self.seed, i, n), self.rank, self.world_size,
                                      role, self.roles), self.shuffle_buffer,
                          random.Random(seed_of("shuffle", self.seed, i, self.rank, role, n)), handler)

        if self.resample:
            # the logical worker is in the seeds: webdataset's default worker seed is the DataLoader worker id
            readers = [Reader(Resampled(e.urls, seed_of("shards", self.seed, i, self.rank, role)),
                              self.shuffle_buffer, random.Random(seed_of("shuffle", self.seed, i, self.rank, role)),
                              handler, DryShards(e))
                       for i, e in enumerate(self.entries)]
        else:
            readers = [Epochs(partial(epoch, e, i), f"dataset {e.name}: rank {self.rank} worker {role}")
                       for i, e in enumerate(self.entries)]
        return Mixer(readers, self.weights, random.Random(seed_of("mix", self.seed, self.rank, role)))

    def items(self, role: int, consumed: int, saved: list | None) -> Iterator[Item]:
        """One Item per raw sample of logical worker `role`, after the `consumed` ones of a run it
        resumes: from `saved`, [n, the pipeline's state after its n-th sample] with n <= consumed,
        it draws the few samples from n to `consumed` (a seek), or else all of them (a replay);
        as references either way (the same RNG draws, nothing read or made). Every STATE_EVERY-th
        item carries the state after it (a state is tens of kB: not one per item)."""
        skips = Skips()
        raw = self.raw_samples(role, skips.handler)
        if saved is not None:
            raw.set_state(saved[1])
        raw.skip(consumed - (saved[0] if saved is not None else 0))
        skips.clear()  # the read errors met before `consumed` were counted by the run that met them
        for n, sample in enumerate(raw, consumed + 1):
            made = None
            try:
                made = self.make(load(sample))
            except Exception as e:  # noqa: BLE001 - counted, reported with key+shard, rate-limited
                skips.append((where(sample), str(e)))
            state = raw.state() if n % STATE_EVERY == 0 else None
            yield Item(role, made, skips.drain(), where(sample), None if state is None else [n, state])


class Roles(IterableDataset):
    """What the DataLoader's workers run. Worker w plays role (w + first) % roles: torch starts each
    DataLoader at worker 0, so after a resume the role whose turn was next goes first."""

    def __init__(self, readers: Readers, consumed: list[int], saved: list[list | None], first: int):
        self.readers, self.consumed, self.saved, self.first = readers, consumed, saved, first

    def __iter__(self) -> Iterator[Item]:
        role = (get_worker_info().id + self.first) % self.readers.roles
        return self.readers.items(role, self.consumed[role], self.saved[role])


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
        self._states: list[list | None] = [None] * self.readers.roles  # [n, pipeline state after n] of each
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
        return DataLoader(Roles(self.readers, self._consumed, self._states, self._next), batch_size=None,
                          num_workers=self.workers, multiprocessing_context="fork", collate_fn=_as_is,
                          in_order=True, generator=seeds)

    def take(self, k: int) -> list:
        """The next k good items."""
        if self._items is None:
            self._items = (self.readers.items(0, self._consumed[0], self._states[0]) if self.workers == 0
                           else iter(self._loader()))
        out = []
        while len(out) < k:
            item = next(self._items)
            self._consumed[item.role] += 1
            if item.state is not None:
                self._states[item.role] = item.state
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
        not in it: after a resume they are read again. `readers`: each logical worker's latest
        [n, pipeline state after its n-th sample], n <= its `consumed` (None where it has none: a
        resume draws those samples again)."""
        return {"workers": self.workers, "consumed": list(self._consumed), "next": self._next,
                "readers": list(self._states)}

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
        self._states = list(state.get("readers") or [None] * self.readers.roles)
        replay = sum(n for n, saved in zip(self._consumed, self._states, strict=True) if saved is None and n >= STATE_EVERY)
        if replay:
            log.info("data: the checkpoint holds no pipeline state for some decode workers (written without one, or "
                     "a dataset's shards are read with their bytes: remote, pipe: or .tar.gz); drawing their %d "
                     "consumed samples again", replay)


def _as_is(item: Item) -> Item:
    """collate_fn: items go to the main process as they are (the default would convert their contents)."""
    return item


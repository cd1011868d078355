"""A manifest stream's reading pipeline as objects whose state a checkpoint holds, so a resume sets
that state instead of drawing every consumed sample again (docs/decisions.md).

Per dataset a `Reader` draws shards (`Resampled`: with replacement, as wds.ResampledShards draws
them; `EpochShards`: one epoch's seeded shard order split by node and worker, as
wds.SimpleShardList and the split), hands out each shard's samples (from its index as references,
omni/data/tar_index.py) and shuffles them in a buffer with wds.shuffle's algorithm and its own
`pick`; `Mixer` draws the dataset of each sample by weight. They make the same RNG draws in the
same order as webdataset's generators, so the sample sequence is theirs (tests/unit/test_seek.py
compares the two); unlike a generator, their state can be read and set: RNG states, the shard
cursor and the buffer as (shard, sample index) references. A dataset whose shards cannot be read
at an offset (remote, `pipe:`, .tar.gz) is read by webdataset's reader with the bytes in the
samples: its state is None, and a resume draws again up to its position (replay).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import webdataset as wds

from omni.config import ConfigError
from omni.data.manifest import DatasetEntry
from omni.data.tar_index import ShardReadError, seekable, shard_index

Ref = tuple[str, int]  # (shard, index of the sample in the shard's index)


class DryShards:
    """Resampling draws shards forever, so a dataset whose shards hold no sample (empty or unreadable
    tars) would spin without a word: after `limit` shard draws in a row without a sample it stops the
    run with a ConfigError naming the dataset and the last shard."""

    def __init__(self, entry: DatasetEntry):
        self.name, self.dry = entry.name, 0
        self.limit = 50 + 2 * len(wds.shardlists.expand_urls(entry.urls))

    def drew(self, url: str) -> None:
        self.dry += 1
        if self.dry > self.limit:
            raise ConfigError(f"dataset {self.name}: {self.limit} shard reads in a row gave no sample "
                              f"(last: {url}); its shards are empty or unreadable: fix the manifest's urls")


class Resampled:
    """wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0, deterministic=True)'s first
    iteration: one seeded `randint` per shard, for ever."""

    def __init__(self, urls: str | list[str], seed: int):
        self.urls = wds.shardlists.expand_source(urls, int(1e6))
        if not self.urls:
            raise ValueError("empty_check=True, but no shards found in ResampledShards")
        self.rng = random.Random(wds.utils.make_seed(0, 0, seed))

    def next(self) -> str | None:
        return self.urls[self.rng.randint(0, len(self.urls) - 1)]

    def state(self) -> Any:
        return self.rng.getstate()

    def set_state(self, state: Any) -> None:
        self.rng.setstate(_tuples(state))


def take_every(start: int, step: int) -> Callable[[Iterator], Iterator]:
    """Pipeline stage keeping every `step`-th shard from `start`: the slice wds.split_by_node and
    wds.split_by_worker take, with the rank and role given here. Theirs come from process state
    (RANK/WORLD_SIZE or torch.distributed; get_worker_info()), but after a resume a DataLoader worker
    plays another worker's role, and tests run several ranks in one process."""
    return lambda shards: itertools.islice(shards, start, None, step)


class EpochShards:
    """One epoch's shards: wds.SimpleShardList(urls, seed)'s order split by node (`rank` of `world`)
    and by worker (`role` of `roles`); None at its end."""

    def __init__(self, urls: str | list[str], seed: int, rank: int, world: int, role: int, roles: int):
        order = (shard["url"] for shard in wds.SimpleShardList(urls, seed=seed))
        self.urls = list(take_every(role, roles)(take_every(rank, world)(order)))
        self.pos = 0

    def next(self) -> str | None:
        self.pos += 1
        return self.urls[self.pos - 1] if self.pos <= len(self.urls) else None

    def state(self) -> int:
        return self.pos

    def set_state(self, state: int) -> None:
        self.pos = state


class Reader:
    """One dataset's samples: shards from `shards`, their samples in order, shuffled in a buffer of
    `bufsize` (wds.shuffle with initial=min(bufsize, 100) and `rng`). `handler` gets read errors
    (webdataset's handler contract); `dry`, when given, watches for shards without samples."""

    def __init__(self, shards: Resampled | EpochShards, bufsize: int, rng: random.Random,
                 handler: Callable[[Exception], bool], dry: DryShards | None = None):
        self.shards, self.bufsize, self.rng, self.handler, self.dry = shards, bufsize, rng, handler, dry
        self.initial = min(bufsize, 100)
        self.buf: list = []
        self.ended = False                 # the shards ran out (an epoch's end)
        self.url: str | None = None        # the shard being read
        self.pos = 0                       # its samples handed to the buffer (a seekable shard)
        self.members: Iterator[dict] | None = None  # its samples (a shard webdataset reads with the bytes)
        self.seeks = all(seekable(u) for u in shards.urls)

    def _sample(self) -> Ref | dict | None:
        """The next sample of the shards in order (the tar stage), None when the shards end."""
        while True:
            if self.url is not None:
                if self.members is None:
                    index = shard_index(self.url)
                    if self.pos < len(index.samples):
                        self.pos += 1
                        return self._got((self.url, self.pos - 1))
                    for why in index.errors:
                        self.handler(ShardReadError(why))
                else:
                    sample = next(self.members, None)
                    if sample is not None:
                        return self._got(sample)
                self.url, self.members = None, None
            url = self.shards.next()
            if url is None:
                return None
            if self.dry is not None:
                self.dry.drew(url)
            self.url, self.pos = url, 0
            if not seekable(url):
                self.members = wds.tariterators.tarfile_samples(iter([{"url": url}]), handler=self.handler)

    def _got(self, sample: Ref | dict) -> Ref | dict:
        if self.dry is not None:
            self.dry.dry = 0
        return sample

    def next(self) -> dict | None:
        """The next shuffled sample (a reference into its shard's index, or with its bytes); None at
        the end of the shards. wds.shuffle's loop, one sample per call."""
        while not self.ended:
            sample = self._sample()
            if sample is None:
                self.ended = True
                break
            self.buf.append(sample)
            if len(self.buf) < self.bufsize:
                more = self._sample()
                if more is None:
                    self.ended = True
                else:
                    self.buf.append(more)
            if len(self.buf) >= self.initial:
                return _resolve(wds.filters.pick(self.buf, self.rng))
        return _resolve(wds.filters.pick(self.buf, self.rng)) if self.buf else None

    def state(self) -> dict | None:
        """Where the reader stands, as lists, tuples, numbers and strings; None for shards read as bytes."""
        if not self.seeks:
            return None
        return {"shards": self.shards.state(), "shuffle": self.rng.getstate(), "buffer": list(self.buf),
                "url": self.url, "pos": self.pos, "ended": self.ended,
                "dry": self.dry.dry if self.dry is not None else 0}

    def set_state(self, state: dict) -> None:
        self.shards.set_state(state["shards"])
        self.rng.setstate(_tuples(state["shuffle"]))
        self.buf = [(url, i) for url, i in state["buffer"]]
        last: dict[str, int] = {}
        for url, i in self.buf + ([(state["url"], state["pos"] - 1)] if state["url"] and state["pos"] else []):
            last[url] = max(last.get(url, 0), i)
        for url, i in last.items():
            if i >= len(shard_index(url).samples):
                raise ConfigError(f"{url} has fewer samples than when the checkpoint was written (it holds no "
                                  f"sample {i}); do not rewrite shards during a run, or train into a new --out folder")
        self.url, self.pos, self.ended = state["url"], state["pos"], state["ended"]
        if self.dry is not None:
            self.dry.dry = state["dry"]


class Epochs:
    """Endless epochs of one dataset, a new `Reader` (shard order and shuffle) each: `reader(epoch)`.
    An epoch that gives no sample stops the run: every later one would read the same nothing."""

    def __init__(self, reader: Callable[[int], Reader], what: str):
        self.make, self.what = reader, what
        self.epoch, self.empty = 0, True
        self.reader = reader(0)

    def next(self) -> dict:
        while True:
            sample = self.reader.next()
            if sample is not None:
                self.empty = False
                return sample
            if self.empty:
                raise RuntimeError(f"{self.what} read no sample in epoch {self.epoch}; "
                                   "its shards are all empty or unreadable")
            self.epoch, self.empty = self.epoch + 1, True
            self.reader = self.make(self.epoch)

    def state(self) -> dict | None:
        reader = self.reader.state()
        return None if reader is None else {"epoch": self.epoch, "empty": self.empty, "reader": reader}

    def set_state(self, state: dict) -> None:
        self.epoch, self.empty = state["epoch"], state["empty"]
        self.reader = self.make(self.epoch)
        self.reader.set_state(state["reader"])


class Mixer:
    """Endless samples, each from a dataset's reader drawn by weight with `rng` (wds.RandomMix draws
    from the global `random`, so it could not be seeded per stream). `drawn` counts the samples it
    handed out in this process (a resume's seek draws few; tests count them)."""

    def __init__(self, readers: list[Reader | Epochs], weights: list[float], rng: random.Random):
        total = sum(weights)
        self.readers, self.probs, self.rng = readers, [w / total for w in weights], rng
        self.choices = range(len(readers))
        self.drawn = 0
        self._states: list = [None] * len(readers)  # each reader's state, kept until it reads again
        self._stale = set(self.choices)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        self.drawn += 1
        i = self.rng.choices(self.choices, self.probs)[0]
        self._stale.add(i)
        sample = self.readers[i].next()
        if sample is None:  # a resampled reader never ends; epochs go on
            raise RuntimeError("a dataset reader ended")
        return sample

    def state(self) -> dict | None:
        """The state after the samples handed out so far; None when a dataset is read as bytes. Only
        the readers that read since the last call are asked again (one per sample drawn)."""
        for i in self._stale:
            self._states[i] = self.readers[i].state()
        self._stale.clear()
        return None if None in self._states else {"mix": self.rng.getstate(), "readers": list(self._states)}

    def set_state(self, state: dict) -> None:
        self.rng.setstate(_tuples(state["mix"]))
        for reader, saved in zip(self.readers, state["readers"], strict=True):
            reader.set_state(saved)
        self._stale = set(self.choices)

    def skip(self, n: int) -> None:
        """Pass over `n` samples (references: no tar data is read)."""
        for _ in itertools.repeat(None, n):
            next(self)


def _resolve(sample: Ref | dict) -> dict:
    """A buffer entry -> the sample dict (the index's, shared: `load` makes a new one with the bytes)."""
    if isinstance(sample, tuple):
        url, i = sample
        return shard_index(url).samples[i]
    return sample


def _tuples(state: Any) -> Any:
    """An RNG state as `getstate()` gave it (a checkpoint may hand its tuples back as lists)."""
    return tuple(_tuples(x) for x in state) if isinstance(state, list) else state

"""A manifest stream resumes by seek (omni/data/pipeline.py): its position holds the reading
pipeline's state (RNGs, shard cursors, shuffle buffers as references), so a resume at a large
position draws a handful of samples, not every consumed one, and continues with exactly the items
an uninterrupted run has there, on the same or another number of processes. The pipeline's
sequence is webdataset's own (ResampledShards / SimpleShardList + split, tar reading, shuffle) for
indexed and for byte-read shards, with a damaged shard's errors at the same places. A checkpoint
without the state, or a dataset read as bytes, falls back to drawing the samples again (replay)."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import webdataset as wds

from omni.data.loader import SkipCounter
from omni.data.manifest import DatasetEntry
from omni.data.pipeline import take_every
from omni.data.sharded import Readers, ShardStream, seed_of
from omni.data.stream import MixtureStream, merged_position, mixture_samples
from omni.data.tar_index import load, shard_index

LARGE = 5_000


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _write(root: Path, name: str, shards: int, per_shard: int, cut: bool = False) -> DatasetEntry:
    """Samples keyed NAME-sSS-III; `cut`: the last shard is cut off inside its third sample."""
    folder = root / name
    folder.mkdir(parents=True)
    for s in range(shards):
        url = folder / f"{s:02d}.tar"
        with wds.TarWriter(str(url)) as w:
            for i in range(per_shard):
                key = f"{name}-s{s:02d}-{i:03d}"
                w.write({"__key__": key, "json": json.dumps({"k": key}).encode()})
    if cut:
        offset = shard_index(str(url)).samples[2]["json"].offset
        url.write_bytes(url.read_bytes()[: offset + 5])
    return DatasetEntry(name=name, urls=str(folder / f"{{00..{shards - 1:02d}}}.tar"), num_samples=shards * per_shard)


def _piped(entry: DatasetEntry) -> DatasetEntry:
    """The same shards read through `pipe:` (not at an offset: webdataset's reader, bytes in the samples)."""
    return DatasetEntry(name=entry.name + "-pipe", urls=f"pipe:cat {entry.urls}", num_samples=entry.num_samples)


def _key(raw: dict) -> str:
    if raw["__key__"].endswith("-007"):  # a bad sample: the ranks consume unevenly
        raise ValueError("bad")
    return json.loads(raw["json"])["k"]


def _webdataset_mixture(entries, weights, seed, buffer, handler):
    """MixtureStream's sequence as webdataset's own stages give it (its tar reader: bytes, no index)."""
    pipes = [iter(wds.DataPipeline(
        wds.ResampledShards(e.urls, seed=seed * 1000 + i, deterministic=True, worker_seed=lambda: 0),
        wds.tarfile_to_samples(handler=handler),
        wds.shuffle(buffer, initial=min(buffer, 100), rng=random.Random(seed * 1000 + i)),
    )) for i, e in enumerate(entries)]
    rng, total = random.Random(seed), sum(weights)
    while True:
        yield next(pipes[rng.choices(range(len(pipes)), [w / total for w in weights])[0]])


def _webdataset_epochs(entry, index, seed, buffer, rank, world, role, roles, handler):
    """One logical worker's epochs of one dataset (partition shard, resample false), webdataset's way."""
    for epoch in range(3):
        yield from wds.DataPipeline(
            wds.SimpleShardList(entry.urls, seed=seed_of("epoch", seed, index, epoch)),
            take_every(rank, world), take_every(role, roles), wds.tarfile_to_samples(handler=handler),
            wds.shuffle(buffer, initial=min(buffer, 100), rng=random.Random(seed_of("shuffle", seed, index, rank, role,
                                                                                    epoch))))


def _keys(samples, n: int) -> list[str]:
    return [load(next(samples))["__key__"] for _ in range(n)]


def test_the_pipeline_draws_webdatasets_sequence(tmp_path):
    a, b = _write(tmp_path, "a", 3, 9, cut=True), _write(tmp_path, "b", 2, 5)
    for entries in ([a, b], [a, _piped(b)]):
        ours, theirs = SkipCounter(max_fraction=1.0), SkipCounter(max_fraction=1.0)
        got = _keys(mixture_samples(entries, [2.0, 1.0], 3, 7, ours.handler), 400)
        assert got == _keys(_webdataset_mixture(entries, [2.0, 1.0], 3, 7, theirs.handler), 400)
        # the cut shard, named each time it is read (webdataset's reader names it twice: the member, the tar)
        assert 2 * ours.skipped == theirs.skipped > 0
    readers = Readers([a], [1.0], 5, 6, False, _key, rank=1, world_size=2, roles=1)
    mixer = readers.raw_samples(0, SkipCounter(max_fraction=1.0).handler)
    epochs = _webdataset_epochs(a, 0, 5, 6, 1, 2, 0, 1, SkipCounter(max_fraction=1.0).handler)
    expected = [s["__key__"] for s in epochs]  # rank 1 reads 1 of the 3 shards an epoch
    assert len(expected) >= 3 * 2 and _keys(mixer, len(expected)) == expected


def _mixture(entries, rank: int, world: int, counter=None) -> MixtureStream:
    return MixtureStream(entries, [2.0, 1.0], 0, 16, _key, counter or SkipCounter(max_fraction=0.5), rank=rank,
                         world_size=world)


@pytest.mark.parametrize("after", [2, 3, 1])
def test_a_mixture_resumes_at_a_large_position_drawing_a_few_samples(tmp_path, after):
    entries = [_write(tmp_path, "a", 4, 25), _write(tmp_path, "b", 2, 25)]
    whole = _mixture(entries, 0, 1)
    whole.take(LARGE + 200)
    sequence = dict(whole.taken())  # position -> sample, as one process reads it (bad ones included)

    stopped = [_mixture(entries, r, 2) for r in (0, 1)]
    for r, rank in enumerate(stopped):
        rank.take(LARGE // 2 - 40 + 30 * r)  # uneven, and bad samples: the frontier lies behind rank 1
    states = [rank.state() for rank in stopped]
    frontier, done = merged_position(states)
    assert done and all("reader" in s for s in states)

    resumed = [_mixture(entries, r, after) for r in range(after)]
    for rank in resumed:
        rank.restore(states)
        rank.take(20)
        # the seek: from the saved state at or before the frontier, the few samples up to it, then
        # the ~20 x `after` it passes over or takes (a replay would draw the ~5,000 before the frontier)
        assert rank.samples.drawn < 100
    again = [(p, k) for rank in resumed for p, k in rank.taken()]
    assert all(sequence[p] == k for p, k in again)  # the very samples an uninterrupted run has there
    assert not {p for p, _ in again} & set(done) and min(p for p, _ in again) >= frontier


def test_a_position_without_pipeline_state_is_replayed_with_the_same_items(tmp_path, caplog):
    entries = [_write(tmp_path, "a", 4, 25), _write(tmp_path, "b", 2, 25)]
    run = _mixture(entries, 0, 1)
    run.take(300)
    state = run.state()
    after = run.take(20)
    old = {k: v for k, v in state.items() if k != "reader"}  # a checkpoint written before the states
    for saved in (state, old):
        resumed = _mixture(entries, 0, 1)
        with caplog.at_level(logging.INFO, logger="omni.data.stream"):
            resumed.restore([saved])
        assert resumed.take(20) == after
        replayed = resumed.samples.drawn >= state["next"]
        assert replayed == (saved is old) == ("replaying" in caplog.text)

    piped = [entries[0], _piped(entries[1])]  # a dataset read as bytes has no state: the resume replays
    run = _mixture(piped, 0, 1)
    run.take(50)
    state = run.state()
    assert "reader" not in state
    after = run.take(5)
    resumed = _mixture(piped, 0, 1)
    resumed.restore([state])
    assert resumed.take(5) == after and resumed.samples.drawn >= state["next"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resample", [True, False])
def test_a_shard_partition_resumes_from_its_workers_pipeline_states(tmp_path, monkeypatch, resample, workers):
    entries = [_write(tmp_path, "a", 4, 25), _write(tmp_path, "b", 4, 25)]
    mixers = []
    raw_samples = Readers.raw_samples  # record every logical worker's pipeline built in this process
    monkeypatch.setattr(Readers, "raw_samples", lambda self, role, handler:
                        mixers.append(raw_samples(self, role, handler)) or mixers[-1])

    def stream():
        return ShardStream(entries, [2.0, 1.0], seed=0, shuffle_buffer=16, resample=resample, make=_key,
                           counter=SkipCounter(max_fraction=0.5), rank=1, world_size=2, workers=workers)

    run = stream()
    run.take(LARGE // 4 + 3)  # many epochs of each logical worker's 2 shards
    state = run.state()
    after = run.take(30)
    assert _loaded(tmp_path, state) == state  # a checkpoint (loaded with weights_only) holds it as it is
    assert all(s is not None for s in state["readers"])

    mixers.clear()
    resumed = stream()
    resumed.restore([None, _loaded(tmp_path, state)])  # rank 1 of 2
    assert resumed.take(30) == after
    if workers == 0:  # the workers' pipelines run in their own processes
        # from the state at most 15 samples back (STATE_EVERY), then the 30 items: nothing from the start
        assert len(mixers) == 1 and mixers[0].drawn < 15 + 40
    old = {k: v for k, v in state.items() if k != "readers"}  # a checkpoint without the states: a replay
    mixers.clear()
    replayed = stream()
    replayed.restore([None, old])
    assert replayed.take(30) == after
    assert workers or mixers[0].drawn > sum(state["consumed"])


def _saved(tmp_path: Path, state) -> Path:
    path = tmp_path / "state.pt"
    torch.save({"samples": [state]}, path)
    return path


def _loaded(tmp_path: Path, state):
    return torch.load(_saved(tmp_path, state), weights_only=True)["samples"][0]

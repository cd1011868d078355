"""The streams hand out sample references (omni/data/tar_index.py) and read a sample's bytes only
when it is made: even a resume from a position without pipeline state (a checkpoint written
before the states, which replays: tests/unit/test_seek.py has the seek) reads none of the samples
before it, yet continues with exactly the items an uninterrupted run has there. The index gives
webdataset's own samples, is cached until its shard changes, and names a damaged shard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from omni.data.loader import SkipCounter
from omni.data.manifest import DatasetEntry
from omni.data.sharded import ShardStream
from omni.data.stream import MixtureStream
from omni.data.tar_index import _indexes, load, shard_index

PAD = 2048  # bytes of every sample's payload: a replay of N samples reads > N * PAD bytes
LARGE = 5_000


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _write(root: Path, name: str, shards: int, per_shard: int) -> DatasetEntry:
    folder = root / name
    folder.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:02d}.tar")) as w:
            for i in range(per_shard):
                key = f"{name}-s{s:02d}-{i:03d}"
                w.write({"__key__": key, "json": json.dumps({"k": key}).encode(), "bin": bytes([i % 256]) * PAD})
    return DatasetEntry(name=name, urls=str(folder / f"{{00..{shards - 1:02d}}}.tar"), num_samples=shards * per_shard)


def _key(raw: dict) -> str:
    assert json.loads(raw["json"])["k"] == raw["__key__"] and len(raw["bin"]) == PAD  # the bytes were read
    return raw["__key__"]


def _bytes_read() -> int:
    """Bytes this process has read through read() calls (Linux)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def _seeks_without_reading(stream, state, expected) -> None:
    before = _bytes_read()
    stream.restore(state)
    assert stream.take(len(expected)) == expected
    assert _bytes_read() - before < 100 * PAD  # the items taken, none of the LARGE samples before them


def test_a_mixture_replays_a_large_position_reading_no_tar_data(tmp_path):
    entries = [_write(tmp_path, "a", 4, 25), _write(tmp_path, "b", 2, 25)]

    def stream(rank):
        return MixtureStream(entries, [2.0, 1.0], 0, 16, _key, SkipCounter(), rank=rank, world_size=2)

    whole = stream(1)
    expected = whole.take(LARGE // 2 + 6)[LARGE // 2:]  # rank 1's positions LARGE+1, LARGE+3, ...
    states = [{"world_size": 2, "rank": r, "frontier": 0, "done": [], "next": LARGE + r} for r in (0, 1)]
    _seeks_without_reading(stream(1), states, expected)


@pytest.mark.parametrize("resample", [True, False])
def test_a_shard_partition_replays_a_large_position_reading_no_tar_data(tmp_path, resample):
    entries = [_write(tmp_path, "a", 4, 25), _write(tmp_path, "b", 2, 25)]

    def stream():
        return ShardStream(entries, [2.0, 1.0], seed=0, shuffle_buffer=16, resample=resample, make=_key,
                           counter=SkipCounter())

    expected = stream().take(LARGE + 6)[LARGE:]
    _seeks_without_reading(stream(), [{"workers": 0, "consumed": [LARGE], "next": 0}], expected)


def test_the_index_gives_webdatasets_samples_and_follows_a_rewritten_shard(tmp_path):
    entry = _write(tmp_path, "d", 1, 5)
    url = entry.urls.replace("{00..00}", "00")
    ours = [load(s) for s in shard_index(url).samples]
    assert ours == list(wds.DataPipeline(wds.SimpleShardList(url), wds.tarfile_to_samples()))
    cached = list((tmp_path / "cache/omni/tar-index").iterdir())
    assert len(cached) == 1
    _indexes.clear()  # another process: reads the cache, no new scan written
    written = cached[0].stat().st_mtime_ns
    assert shard_index(url) == shard_index(url) and cached[0].stat().st_mtime_ns == written
    assert [s["__key__"] for s in shard_index(url).samples] == [f"d-s00-{i:03d}" for i in range(5)]

    with wds.TarWriter(url) as w:  # the shard is rewritten: other size, other samples
        w.write({"__key__": "new", "json": b"{}"})
    assert [s["__key__"] for s in shard_index(url).samples] == ["new"]


def test_a_cut_shard_keeps_its_samples_before_the_damage_and_names_it(tmp_path):
    entry = _write(tmp_path, "d", 1, 6)
    url = entry.urls.replace("{00..00}", "00")
    data = Path(url).read_bytes()
    json_3 = shard_index(url).samples[3]["json"]  # TarWriter writes a sample's bin, then its json
    Path(url).write_bytes(data[: json_3.offset + 10])  # inside sample 3's json
    index = shard_index(url)
    assert [s["__key__"] for s in index.samples] == [f"d-s00-{i:03d}" for i in range(4)]
    assert "json" not in index.samples[3] and len(index.errors) == 1
    assert url in index.errors[0] and "cut off" in index.errors[0] and "\n" not in index.errors[0]
    Path(url).write_bytes(data[: json_3.offset + 512 + 100])  # inside the next header
    assert len(shard_index(url).samples) == 4 and "no tar header" in shard_index(url).errors[0]
    # the streams report the reason at every read of the shard: tests/unit/test_seek.py

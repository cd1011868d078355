"""`ShardDatasink` without a Ray instance: its write-task side and its driver side called directly, as
Ray Data calls them (`write` per task, `on_write_complete` with the tasks' returns in any order). A
rerun task writes its temporary shards once, the verb's loop sees the rows in rank order before the
renames, which keep rank order; a count that disagrees, or a loop that fails, renames nothing."""
from __future__ import annotations

import json
import pickle

import pytest
import webdataset as wds
from ray.data.datasource import WriteResult

from omni.curate.ray_write import ShardDatasink


def route(rank, raw, result):
    return None if raw["__key__"].startswith("skip") else f"set{rank[0] % 2}"


def task_items(first: int, n: int) -> list[tuple]:
    """One write task's items: (rank, raw, result) with rank (i,); every fifth sample routed nowhere."""
    items = []
    for i in range(first, first + n):
        key = f"skip{i}" if i % 5 == 4 else f"k{i:03d}"
        items.append(((i,), {"__key__": key, "json": json.dumps({"i": i}).encode(), "jpg": b"x" * 10}, None))
    return items


def complete(sink: ShardDatasink, returns: list) -> None:
    sink.on_write_complete(WriteResult(num_rows=0, size_bytes=0, write_returns=returns))


def counting_fold(sink: ShardDatasink, seen: list):
    """A verb's loop: every row seen; each routed sample counted in its set's sink."""
    def fold(items):
        for rank, raw, _ in items:
            seen.append((rank, raw))
            if raw["__to__"]:
                sink.sink(raw["__to__"]).write(raw)
    return fold


def test_a_rerun_task_is_written_once_and_the_loop_and_the_shards_keep_rank_order(tmp_path):
    sink = ShardDatasink(tmp_path / "shards", route, samples_per_shard=3)
    sink.on_write_start()
    worker = pickle.loads(pickle.dumps(sink))          # what a write task gets
    tasks = {f: task_items(f, 10) for f in (10, 0, 20)}
    returns = [worker.write_items(items) for items in tasks.values()]   # the tasks finish out of order
    assert worker.write_items(tasks[0]) == returns[1]  # task 0 rerun after its worker died
    assert worker.write_items([]) is None
    seen = []
    sink.fold = counting_fold(sink, seen)
    complete(sink, returns + [None])
    assert [rank for rank, _ in seen] == [(i,) for i in range(30)]
    assert all(raw["jpg"] == b"" and raw["json"] == json.dumps({"i": rank[0]}).encode() for rank, raw in seen)
    assert not (tmp_path / "shards" / ".partial").exists()
    for stem in ("set0", "set1"):
        written = sink.sinks[stem]
        samples = list(wds.DataPipeline(wds.SimpleShardList(str(tmp_path / written.urls(tmp_path))),
                                        wds.tarfile_to_samples()))
        want = [f"k{i:03d}" for i in range(30) if i % 5 != 4 and i % 2 == int(stem[-1])]
        assert [s["__key__"] for s in samples] == want and written.count == len(want)
        assert written.num_shards == len(list((tmp_path / "shards").glob(f"{stem}-*.tar"))) and written.bytes > 0
        assert all(s["jpg"] == b"x" * 10 for s in samples)


def test_a_count_that_disagrees_or_a_loop_that_fails_renames_nothing(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "set0-000000.tar").write_bytes(b"an earlier run's shard")
    for fold in (lambda items: [sink.sink("set0").write(next(iter(items))[1])],    # counts one sample of two
                 lambda items: 1 / 0):                                            # the verb's loop raises
        sink = ShardDatasink(tmp_path / "shards", route, samples_per_shard=3)
        sink.on_write_start()
        sink.fold = fold
        with pytest.raises((RuntimeError, ZeroDivisionError)) as e:
            complete(sink, [sink.write_items(task_items(0, 4))])
        sink.on_write_failed(e.value)   # what Ray Data calls when on_write_complete raises
        assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["set0-000000.tar"]
    with pytest.raises(RuntimeError, match="was written to 'set0'"):
        sink.sink("set1").write({"__key__": "k000", "__to__": "set0"})


def test_a_later_window_that_fails_removes_the_shards_earlier_windows_renamed(tmp_path):
    seen = []
    sink = ShardDatasink(tmp_path / "shards", route, samples_per_shard=3)
    sink.fold = counting_fold(sink, seen)
    for first in (0, 10):       # build: one write per window of records; numbering goes on
        sink.on_write_start()
        complete(sink, [sink.write_items(task_items(first, 10))])
    assert sink.sinks["set0"].num_shards == len(list((tmp_path / "shards").glob("set0-*.tar"))) == 4
    sink.on_write_start()
    sink.on_write_failed(RuntimeError("a task failed for good"))
    assert not list((tmp_path / "shards").iterdir())

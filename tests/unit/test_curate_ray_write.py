"""`ShardWrites` without Ray: a retried block writes its temporary shards once, the driver's rename keeps
rank order, and a verb whose count disagrees with the workers' is stopped before any rename."""
from __future__ import annotations

import json

import pytest
import webdataset as wds

from omni.curate.ray_write import ShardWrites, light


def route(rank, raw, result):
    return None if raw["__key__"].startswith("skip") else f"set{rank[0] % 2}"


def block(first: int, n: int) -> list[tuple[str | None, dict]]:
    items = []
    for i in range(first, first + n):
        key = f"skip{i}" if i % 5 == 4 else f"k{i:03d}"
        raw = {"__key__": key, "json": json.dumps({"i": i}).encode(), "jpg": b"x" * 10}
        items.append((route((i,), raw, None), raw))
    return items


def test_a_retried_block_is_written_once_and_shards_keep_rank_order(tmp_path):
    writes = ShardWrites(tmp_path / "shards", route, samples_per_shard=3)
    writes.start()
    blocks = {f"{f:012d}": block(f, 10) for f in (10, 0, 20)}
    for tag, items in blocks.items():   # the blocks finish out of order
        writes.write_block(tag, items)
    writes.write_block(f"{0:012d}", blocks[f"{0:012d}"])   # block 0's task rerun after its worker died
    sinks = {s: writes.sink(s) for s in ("set0", "set1")}
    for tag in sorted(blocks):           # what the driver receives, in rank order
        for stem, raw in blocks[tag]:
            light_raw = light(raw, stem)
            assert light_raw["jpg"] == b"" and light_raw["json"] == raw["json"]
            writes.seen(light_raw)
            if stem:
                sinks[stem].write(light_raw)
    writes.commit(sinks)
    assert not (tmp_path / "shards" / ".partial").exists()
    for stem, sink in sinks.items():
        samples = list(wds.DataPipeline(wds.SimpleShardList(str(tmp_path / sink.urls(tmp_path))),
                                        wds.tarfile_to_samples()))
        want = [raw["__key__"] for tag in sorted(blocks) for s, raw in blocks[tag] if s == stem]
        assert [s["__key__"] for s in samples] == want and sink.count == len(want)
        assert sink.num_shards == len(list((tmp_path / "shards").glob(f"{stem}-*.tar"))) and sink.bytes > 0


def test_a_count_that_disagrees_with_the_workers_renames_nothing(tmp_path):
    writes = ShardWrites(tmp_path / "shards", route, samples_per_shard=3)
    writes.start()
    items = block(0, 4)
    writes.write_block(f"{0:012d}", items)
    sinks = [writes.sink("set0")]
    for stem, raw in items:
        writes.seen(light(raw, stem))
    sinks[0].write(light(items[0][1], items[0][0]))   # the verb counts one of the two samples written
    with pytest.raises(RuntimeError, match="disagree"):
        writes.commit(sinks)
    assert not list((tmp_path / "shards").glob("*.tar"))
    with pytest.raises(RuntimeError, match="was written to 'set0'"):
        writes.sink("set1").write(light(items[0][1], items[0][0]))

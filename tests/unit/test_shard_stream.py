"""data.partition: shard — ranks and decode workers read disjoint shards, deterministically, and a
resume continues exactly where the stream stopped (omni/data/sharded.py, docs/data.md); the one
builder picks the stream of a stage's data section (omni/data/training.py)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import webdataset as wds

from omni.config import ConfigError
from omni.data.config import DataConfig
from omni.data.loader import SkipCounter, TooManyBadSamples, decode_sample
from omni.data.manifest import DatasetEntry, load_manifest
from omni.data.pipeline import take_every
from omni.data.sharded import ShardStream
from omni.data.stream import MixtureStream, RecordStream
from omni.data.training import training_stream
from omni.model.processor import OmniProcessor


def _write(root: Path, name: str, shards: int, per_shard: int, bad_json: tuple[str, ...] = ()) -> DatasetEntry:
    """Text samples keyed NAME-sSS-III (the key names its shard); keys in `bad_json` get broken JSON."""
    folder = root / name
    folder.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:02d}.tar")) as w:
            for i in range(per_shard):
                key = f"{name}-s{s:02d}-{i:03d}"
                meta = {"messages": [{"role": "user", "content": key}, {"role": "assistant", "content": "ok"}]}
                w.write({"__key__": key, "json": b"{broken" if key in bad_json else json.dumps(meta).encode()})
    return DatasetEntry(name=name, urls=str(folder / f"{{00..{shards - 1:02d}}}.tar"),
                        num_samples=shards * per_shard)


def _key(raw: dict) -> str:
    """make(raw) for text samples: decoded like any sample, the item is the sample's key."""
    decode_sample(raw)
    return raw["__key__"]


def _stream(entries, weights=None, counter=None, make=_key, **kw) -> ShardStream:
    kw = {"seed": 0, "shuffle_buffer": 8, "resample": True, "rank": 0, "world_size": 1, "workers": 0, **kw}
    return ShardStream(entries, weights or [1.0] * len(entries), make=make, counter=counter or SkipCounter(), **kw)


def _shard(key: str) -> str:
    return key.rsplit("-", 1)[0]


def test_an_epoch_reads_every_sample_once_over_ranks_and_workers(tmp_path):
    entry = _write(tmp_path, "d", shards=8, per_shard=5)
    # 2 ranks x 2 workers: each logical worker owns 2 shards (10 samples); the round robin
    # alternates a rank's two workers, so a rank's first 20 items are its workers' whole epoch
    got = [_stream([entry], resample=False, rank=r, world_size=2, workers=2).take(20) for r in (0, 1)]
    every = [f"d-s{s:02d}-{i:03d}" for s in range(8) for i in range(5)]
    assert sorted(got[0] + got[1]) == every
    assert not {_shard(k) for k in got[0]} & {_shard(k) for k in got[1]}


@pytest.mark.parametrize(("rank", "world_size", "role", "roles"), [(0, 2, 0, 2), (1, 2, 1, 2), (1, 3, 0, 2)])
def test_the_shard_split_is_webdatasets(monkeypatch, rank, world_size, role, roles):
    """take_every slices like wds.split_by_node + wds.split_by_worker, given the rank and role explicitly."""
    urls = [f"{i}.tar" for i in range(13)]
    for var, value in {"RANK": rank, "WORLD_SIZE": world_size, "WORKER": role, "NUM_WORKERS": roles}.items():
        monkeypatch.setenv(var, str(value))
    ours = take_every(role, roles)(take_every(rank, world_size)(iter(urls)))
    assert list(ours) == list(wds.split_by_worker(wds.split_by_node(iter(urls))))


def test_a_stream_is_a_function_of_seed_rank_and_workers(tmp_path):
    entries = [_write(tmp_path, "a", shards=4, per_shard=5), _write(tmp_path, "b", shards=4, per_shard=5)]
    first = _stream(entries, rank=0, world_size=2).take(30)
    assert _stream(entries, rank=0, world_size=2).take(30) == first
    assert _stream(entries, rank=1, world_size=2).take(30) != first
    assert _stream(entries, rank=0, world_size=2, seed=1).take(30) != first
    # one decode process plays the one logical worker that decoding inline plays
    assert _stream(entries, rank=0, world_size=2, workers=1).take(30) == first



def test_starting_decode_workers_leaves_the_training_rng_alone(tmp_path):
    entry = _write(tmp_path, "d", shards=2, per_shard=3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _stream([entry], workers=2).take(4)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resample", [True, False])
def test_a_restored_stream_continues_exactly(tmp_path, resample, workers):
    entries = [_write(tmp_path, "a", shards=8, per_shard=5, bad_json=("a-s03-001",)),
               _write(tmp_path, "b", shards=4, per_shard=5)]
    setup = {"resample": resample, "workers": workers, "rank": 1, "world_size": 2}
    for stop in (12, 13):  # with 2 workers one of them leaves the round robin mid-cycle
        run = _stream(entries, [2.0, 1.0], **setup)
        run.take(stop)  # the workers have prefetched beyond it
        state = run.state()
        after = run.take(24)  # across epoch ends: each logical worker has 10 (a) and 5 (b) samples an epoch
        assert pickle.loads(pickle.dumps(state)) == state
        assert state["next"] == sum(state["consumed"]) % max(workers, 1)

        resumed = _stream(entries, [2.0, 1.0], **setup)
        resumed.restore([None, state])  # rank 1 of 2
        assert resumed.take(24) == after
        assert resumed.consumed == run.consumed


def test_a_restored_stream_of_real_examples_continues_exactly(tiny_corpus, tiny_model):
    model, tokenizer = tiny_model
    processor = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    entries = load_manifest(tiny_corpus).select("train")

    def make(raw):
        _, messages, media = decode_sample(raw)
        return processor(messages, media)

    run = _stream(entries, make=make, workers=2, seed=3)
    run.take(5)
    state = run.state()
    after = run.take(6)
    resumed = _stream(entries, make=make, workers=2, seed=3)
    resumed.restore([state])
    got = resumed.take(6)
    assert len(got) == 6
    for a, b in zip(got, after, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_the_resampled_mixture_follows_the_weights(tmp_path):
    entries = [_write(tmp_path, "a", shards=4, per_shard=20), _write(tmp_path, "b", shards=4, per_shard=20)]
    got = _stream(entries, [1.0, 3.0], shuffle_buffer=20).take(2000)
    assert abs(sum(k.startswith("b-") for k in got) / len(got) - 0.75) < 0.04


def test_bad_samples_and_corrupt_shards_are_counted_in_the_main_process(tmp_path):
    entry = _write(tmp_path, "d", shards=4, per_shard=5, bad_json=("d-s01-002",))
    (tmp_path / "d" / "04.tar").write_bytes(b"garbage, not a tar file" * 50)
    entry.urls = str(tmp_path / "d" / "{00..04}.tar")
    counter = SkipCounter(max_fraction=0.5, min_seen=10)
    got = _stream([entry], counter=counter, resample=False, workers=2).take(40)  # two epochs
    good = {f"d-s{s:02d}-{i:03d}" for s in range(4) for i in range(5)} - {"d-s01-002"}
    assert set(got) == good and counter.good == 40
    reasons = "\n".join(counter.reasons)
    assert "shard read" in reasons and "04.tar" in reasons
    assert "sample d-s01-002 in" in reasons and "01.tar" in reasons and "not valid JSON" in reasons


def test_too_many_bad_samples_stop_the_run_from_a_worker(tmp_path):
    every_other = tuple(f"d-s{s:02d}-{i:03d}" for s in range(2) for i in range(0, 10, 2))
    entry = _write(tmp_path, "d", shards=2, per_shard=10, bad_json=every_other)
    with pytest.raises(TooManyBadSamples, match="samples skipped"):
        _stream([entry], counter=SkipCounter(max_fraction=0.1, min_seen=10), workers=2).take(20)


def test_epochs_over_too_few_shards_are_a_clear_error(tmp_path):
    entry = _write(tmp_path, "small", shards=3, per_shard=2)
    with pytest.raises(ConfigError, match=r"dataset small: 3 shard\(s\).*2 process\(es\) x 2 decode worker\(s\) = 4"
                                          r".*data\.resample: true"):
        _stream([entry], resample=False, world_size=2, workers=2)
    _stream([entry], resample=True, world_size=2, workers=2)  # resampling needs no shard per reader


def test_a_position_only_restores_into_the_same_layout(tmp_path):
    entry = _write(tmp_path, "d", shards=4, per_shard=2)
    with pytest.raises(ConfigError, match=r"written with data\.workers=2, this run has data\.workers=3"):
        _stream([entry], workers=3).restore([_stream([entry], workers=2).state()])
    with pytest.raises(ConfigError, match="partition: sample"):
        _stream([entry]).restore([12])
    _stream([entry], workers=0).restore([_stream([entry], workers=1).state()])  # one logical worker either way
    two = [_stream([entry], rank=r, world_size=2).state() for r in (0, 1)]
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) with data\.partition: shard, this run has 1"
                                          r".*--nproc_per_node 2.*partition: sample resumes on any number"):
        _stream([entry]).restore(two)
    started = _stream([entry])
    started.take(1)
    with pytest.raises(RuntimeError, match="before the first take"):
        started.restore([started.state()])


def test_the_builder_picks_the_stream_and_each_restores(tmp_path):
    entry = _write(tmp_path, "d", shards=4, per_shard=5)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps({"name": "m", "datasets": [
        {"name": "d", "urls": entry.urls, "num_samples": entry.num_samples}]}))

    def content(record):  # make(record): the stream hands every sample over as a record
        return record["messages"][0]["content"]

    def stream(**data):
        return training_stream(DataConfig(manifest=str(manifest), shuffle_buffer=8, **data), None, 0, content,
                               SkipCounter())

    sample = stream()
    assert isinstance(sample, MixtureStream)
    first = sample.take(7)
    assert sample.state()["next"] == 7
    again = stream()
    again.restore([3])
    assert again.take(4) == first[3:]
    with pytest.raises(ConfigError, match="partition: shard"):
        stream().restore([_stream([entry]).state()])
    shard = stream(partition="shard", workers=2, resample=False)
    assert isinstance(shard, ShardStream) and (shard.workers, shard.readers.resample) == (2, False)
    assert sorted(shard.take(20)) == sorted(f"d-s{s:02d}-{i:03d}" for s in range(4) for i in range(5))
    records = training_stream(DataConfig(records="r.jsonl"), [{"messages": [{"content": "x"}]}], 0, content,
                              SkipCounter())
    assert isinstance(records, RecordStream) and records.take(2) == ["x", "x"]

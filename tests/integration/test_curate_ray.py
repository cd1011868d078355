"""`omni data ... --ray`: every verb on a real local Ray instance writes what the in-process path writes.

One real local Ray instance (2 CPUs, a small object store, no dashboard) serves the module and is
shut down after it; inputs are tiny, so most of the time is Ray starting its workers.
"""
from __future__ import annotations

import argparse
import json
import re

import pytest
import ray
import webdataset as wds
import yaml

from omni.cli.data import add_data_commands
from omni.curate.build import BuildConfig, build
from omni.curate.common import ShardSink, write_manifest
from omni.curate.dedup import DedupConfig, dedup
from omni.curate.ray_backend import RayBackend, RayOptions
from omni.curate.reweight import reweight
from omni.curate.stats import stats
from omni.data.manifest import load_manifest
from tests.helpers import cli_error
from tests.unit.test_curate_build import LLAVA, media  # noqa: F401 - `media` is a fixture used here
from tests.unit.test_curate_dedup import CHAIN_CFG, chain_texts


def sample(key, user, reply, source):
    meta = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
            "task": "chat", "source": source}
    return {"__key__": key, "json": json.dumps(meta).encode()}


def write_entry(root, name, samples, per_shard, weight=1.0):
    sink = ShardSink(root / "in", f"{name}-train", per_shard)
    for s in samples:
        sink.write(s)
    sink.close()
    return {"name": name, "split": "train", "urls": sink.urls(root), "num_samples": sink.count,
            "weight": weight, "modalities": [], "task": "chat"}


@pytest.fixture(scope="module")
def backend():
    """`--ray local` with 2 CPUs; the verbs' own backends (the CLI's too) reuse it and leave it running."""
    with RayBackend(RayOptions(address="local", num_cpus=2, object_store_bytes=200 << 20)) as b:
        yield b
    assert not ray.is_initialized()


def written(manifest) -> list[dict]:
    """Every sample of every entry's shards, in manifest order, as {member: bytes} (urls dropped)."""
    return [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
            for d in load_manifest(manifest).datasets
            for s in wds.DataPipeline(wds.SimpleShardList(d.urls), wds.tarfile_to_samples())]


def rejects(path) -> str:
    """The rejects file with object addresses masked (PIL names the BytesIO it could not read)."""
    return re.sub(r"0x[0-9a-f]+", "0x?", open(path).read())


def manifest_spec(path) -> dict:
    """The manifest with each entry's shard range cut off: on Ray each write task's samples go to shards
    of their own (omni/curate/ray_write.py), so the number of shards may differ; names, counts, weights
    and (with `written`) the samples in order may not."""
    spec = yaml.safe_load(open(path))
    for d in spec["datasets"]:
        d["urls"] = re.sub(r"\{000000\.\.[0-9]{6}\}", "{...}", d["urls"])
    return spec


def check_shards(manifest, per_shard: int) -> None:
    """The shard folder holds exactly the shards the manifest lists (no temporary file left), each
    with at most `per_shard` samples, and every entry's count is its shards' samples."""
    listed = []
    for d in load_manifest(manifest).datasets:
        urls = list(wds.SimpleShardList(d.urls).urls)
        sizes = [sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([u]), wds.tarfile_to_samples())) for u in urls]
        assert sum(sizes) == d.num_samples and max(sizes) <= per_shard and min(sizes) > 0
        listed += urls
    folder = manifest.parent / "shards"
    assert sorted(str(p) for p in folder.iterdir()) == sorted(listed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text datasets over several shards: the A~B~C chain, exact copies within and across
    datasets, sources to group by, distinct fillers, and one sample the quality filter refuses."""
    root = tmp_path_factory.mktemp("ray_corpus")
    a, b, c = chain_texts()
    fillers = [f"question {i} about topic {i * 7} and detail {i * 13}" for i in range(24)]
    first = [sample(f"f{i:03d}", q, f"answer {i} with reason {i * 3} and more words", source=f"src{i % 3}")
             for i, q in enumerate(fillers)]
    first[3:3] = [sample("chainA", a, "ok", source="chain"), sample("chainB", b, "ok", source="chain")]
    first.append(sample("copy1", "What is two plus two?", "Four.", source="src0"))
    second = [sample("chainC", c, "ok", source="chain"), sample("copy2", "what is  TWO plus two?", "four.", source="src1"),
              sample("rep", "buy now", "buy now " * 20, source="src2")]
    second += [sample(f"g{i:03d}", f"another prompt {i} on subject {i * 11}", f"reply {i} of length {i * 5} words",
                      source=f"src{i % 2}") for i in range(10)]
    entries = [write_entry(root, "one", first, per_shard=7), write_entry(root, "two", second, weight=2.0, per_shard=5)]
    return write_manifest(root / "manifest.yaml", "ray_corpus", entries)


def test_dedup_on_ray_equals_in_process_and_removes_the_chain(corpus, backend, tmp_path):
    cfg = DedupConfig(exact="text", threshold=CHAIN_CFG.threshold)
    here = dedup(corpus, tmp_path / "here", cfg, samples_per_shard=6, progress=False)
    there = dedup(corpus, tmp_path / "ray", cfg, samples_per_shard=6, progress=False, backend=backend)
    dups = [json.loads(line) for line in here.duplicates_file.read_text().splitlines()]
    assert {d["key"]: (d["kind"], d["duplicate_of"]["key"]) for d in dups} == {
        "chainB": ("near", "chainA"), "chainC": ("near", "chainA"), "copy2": ("exact", "copy1")}
    assert there.duplicates_file.read_text() == here.duplicates_file.read_text()
    assert written(there.manifest) == written(here.manifest)
    assert manifest_spec(there.manifest) == manifest_spec(here.manifest)
    check_shards(there.manifest, 6)
    report = lambda r: {k: v for k, v in json.loads(r.report_file.read_text()).items()  # noqa: E731
                        if k not in ("manifest_out", "seconds", "samples_per_s", "duplicates_file")}
    assert report(there) == report(here)


def test_build_on_ray_through_the_cli_equals_in_process(media, backend, tmp_path):  # noqa: F811
    src = media / "ray_llava.json"
    src.write_text(json.dumps(LLAVA * 3))
    here = build(BuildConfig(format="llava", inputs=[str(src)], out_dir=str(tmp_path / "here" / "out"), name="mini",
                             media_root=str(media), samples_per_shard=3), progress=False)
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "build", "--format", "llava", "--input", str(src), "--out", str(tmp_path / "ray" / "out"),
                              "--name", "mini", "--media-root", str(media), "--samples-per-shard", "3",
                              "--ray", "local"])
    args.func(args)
    assert here.written == 12 and here.rejected == 24
    assert written(tmp_path / "ray" / "out" / "manifest.yaml") == written(here.manifest)
    assert manifest_spec(tmp_path / "ray" / "out" / "manifest.yaml") == manifest_spec(here.manifest)
    check_shards(tmp_path / "ray" / "out" / "manifest.yaml", 3)
    assert rejects(tmp_path / "ray" / "out" / "reports" / "mini-train.rejects.jsonl") == rejects(here.rejects_file)


@pytest.mark.parametrize("by", ["source", "cluster"])
def test_reweight_on_ray_equals_in_process(corpus, backend, tmp_path, by):
    kw = dict(by=by, alpha=0.5, clusters=3, samples_per_shard=4, progress=False)
    here = reweight(corpus, tmp_path / "here", **kw)
    there = reweight(corpus, tmp_path / "ray", backend=backend, **kw)
    assert sum(here.rejected.get("two", {}).values()) == 1          # the repetitive reply
    assert manifest_spec(there.manifest) == manifest_spec(here.manifest)   # entries, counts, weights
    assert written(there.manifest) == written(here.manifest)
    check_shards(there.manifest, 4)
    assert rejects(there.rejects_file) == rejects(here.rejects_file)


def test_stats_on_ray_equal_in_process(corpus, backend, tmp_path):
    here = stats(corpus, tmp_path / "here", preset="tiny", progress=False)
    there = stats(corpus, tmp_path / "ray", preset="tiny", progress=False, backend=backend)
    assert [d.samples for d in here.datasets] == [27, 13]
    assert json.loads(there.json_file.read_text()) == json.loads(here.json_file.read_text())
    assert there.table == here.table
    # --limit across shard boundaries (7 and 5 samples a shard): the first 9 of each dataset
    here = stats(corpus, tmp_path / "here9", preset="tiny", progress=False, limit=9)
    there = stats(corpus, tmp_path / "ray9", preset="tiny", progress=False, backend=backend, limit=9)
    assert [d.samples for d in here.datasets] == [9, 9]
    assert json.loads(there.json_file.read_text()) == json.loads(here.json_file.read_text())


def test_a_damaged_shard_keeps_its_readable_samples_and_counts_once(backend, tmp_path):
    """The middle of three shards is cut inside its third member: the samples before the cut are kept and the shard is
    one `unreadable` line, from Ray Data's reader as from webdataset's."""
    samples = [sample(f"d{i:02d}", f"prompt {i} on subject {i * 11}", f"reply {i} with {i * 5} words", source="s")
               for i in range(12)]
    entry = write_entry(tmp_path, "dmg", samples, per_shard=5)
    shard = tmp_path / "in" / "dmg-train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:2748])   # two 1 KB samples, then a cut member header
    manifest = write_manifest(tmp_path / "manifest.yaml", "damaged", [entry])
    here = reweight(manifest, tmp_path / "here", by="source", progress=False)
    there = reweight(manifest, tmp_path / "ray", by="source", progress=False, backend=backend)
    lines = [json.loads(line) for line in open(here.rejects_file)]
    assert [(r["code"], "dmg-train-000001.tar" in r["reason"]) for r in lines] == [("unreadable", True)]
    assert rejects(there.rejects_file) == rejects(here.rejects_file)
    keys = [s["__key__"] for s in written(here.manifest)]
    assert keys[:5] == [f"d{i:02d}" for i in range(5)] and keys[-2:] == ["d10", "d11"] and 7 < len(keys) < 12
    assert written(there.manifest) == written(here.manifest)


def test_a_killed_worker_is_retried_and_every_sample_written_once(corpus, backend, tmp_path):
    """The first map task exits its own worker process (os._exit) once; Ray reruns the task and the
    output holds every kept sample exactly once, as in-process."""
    marker = tmp_path / "killed-once"
    failing = RayBackend(RayOptions(fault_marker=str(marker)))
    cfg = DedupConfig(exact="text", threshold=CHAIN_CFG.threshold)
    there = dedup(corpus, tmp_path / "ray", cfg, progress=False, backend=failing)
    assert marker.exists()
    here = dedup(corpus, tmp_path / "here", cfg, progress=False)
    keys = [s["__key__"] for s in written(there.manifest)]
    assert len(keys) == len(set(keys)) == sum(c.kept for c in here.counts)
    assert written(there.manifest) == written(here.manifest)
    check_shards(there.manifest, 5000)


def test_a_worker_killed_while_feeding_the_writer_is_retried(corpus, backend, tmp_path):
    """reweight has one pass: the killed task is one whose samples it writes itself."""
    marker = tmp_path / "killed-once"
    failing = RayBackend(RayOptions(fault_marker=str(marker)))
    there = reweight(corpus, tmp_path / "ray", by="source", progress=False, backend=failing)
    assert marker.exists()
    here = reweight(corpus, tmp_path / "here", by="source", progress=False)
    keys = [s["__key__"] for s in written(there.manifest)]
    assert len(keys) == len(set(keys)) == sum(u.count for u in here.units)
    assert written(there.manifest) == written(here.manifest)
    assert manifest_spec(there.manifest) == manifest_spec(here.manifest)
    check_shards(there.manifest, 5000)


def test_a_job_that_fails_leaves_no_shard_under_a_final_name(corpus, backend, tmp_path):
    """The driver refuses the run (too many groups) in its fold, after the write tasks have written: no
    shard is renamed into place and no manifest written; the next run starts from a clean temporary folder."""
    with pytest.raises(ValueError, match="more than 2 groups"):
        reweight(corpus, tmp_path / "ray", by="source", max_groups=2, progress=False, backend=backend)
    assert not list((tmp_path / "ray" / "shards").glob("*.tar")) and not (tmp_path / "ray" / "manifest.yaml").exists()
    there = reweight(corpus, tmp_path / "ray", by="source", samples_per_shard=4, progress=False, backend=backend)
    check_shards(there.manifest, 4)


def test_sizing_a_cluster_from_the_cli_is_refused():
    assert cli_error("data", "stats", "m.yaml", "--out", "o", "--ray", "auto", "--ray-cpus", "2") == (
        "omni data: --ray-cpus and --ray-object-store-mb size the instance --ray local starts; "
        "a cluster (auto) keeps its own")

"""Curation beyond one process: `omni data dedup` and `omni data build` in-process vs on Ray Data.

    python bench/curation_scale.py                      # dedup on 1000 and 4000 samples, build on 400 records, memory
    python bench/curation_scale.py --n 4000 --build-n 2000
    python bench/curation_scale.py --steps build         # build only (a few minutes on a loaded machine)
    python bench/curation_scale.py --steps memory --mem-n 2000   # the dedup's own memory, 2,000 and 8,000 samples

Side by side in one run, on the same generated input (bench/curation_throughput.py's generators):
  - samples/s of dedup (exact + near, defaults) and build (LLaVA, media decoded) in-process, on a
    local Ray instance with 1 worker CPU and with 2 (`RayBackend`, the `--ray` path: shards read by
    Ray Data's WebDataset datasource and written by Ray Data's write tasks through `ShardDatasink`);
  - peak memory (USS: the pages only that process holds) of the busiest Ray worker and of the
    driver, polled every 0.2 s, as the dedup input grows 4x (same shard size, so 4x the shards);
    a process's baseline (Python, numpy, torch imported by the loader) is most of it at these sizes;
  - `memory`: the near-dedup's own data structures, which that baseline hides, as the input grows
    4x (`--mem-n` and 4x that): tracemalloc's peak of the in-process reduce (signatures streamed
    into the digest and band-bucket dicts, then components), against, on Ray (2 CPUs), the
    tracemalloc peak and row count of the busiest shuffle-part call (a worker's share of the
    group-bys), the driver's peak (edges and components), and what a kept-pass write task is
    given to know the removed samples (its shard's positions) next to the whole removed set;
  - a COMPUTED projection for 200M samples on N nodes from the measured per-worker rates, plus the
    driver's commit (its fold of one light row per sample, and the renames), timed apart.
The outputs of every mode are compared (kept keys) so the rates are for the same work.
"""
from __future__ import annotations

import argparse
import os
import pickle
import platform
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from functools import partial
from pathlib import Path

import psutil
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curation_throughput import make_llava, make_text_shards  # noqa: E402

from omni.curate.build import BuildConfig, build  # noqa: E402
from omni.curate.common import map_samples  # noqa: E402
from omni.curate.dedup import DedupConfig, Signature, Signer, dedup, removed_in_memory, signature_of  # noqa: E402
from omni.data.manifest import load_manifest  # noqa: E402

PER_SHARD = 500          # input and output shard size: a Ray read task per input shard
TARGET = 200_000_000     # samples, for the projection
COMMIT = {"seconds": 0.0}   # Ray: driver seconds in `ShardDatasink.on_write_complete` (fold + renames) of a step


class PeakMemory:
    """Polls the USS of this process and of its Ray worker processes (`ray::...`) in a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.me = every, psutil.Process()
        self.driver = 0
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.me.memory_full_info().uss)
                for p in self.me.children(recursive=True):
                    try:
                        if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                            self.workers[p.pid] = max(self.workers.get(p.pid, 0), p.memory_full_info().uss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        pass
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worker(self) -> int:
        return max(self.workers.values(), default=0)


def kept_keys(manifest: Path) -> list[str]:
    return [s["__key__"] for d in load_manifest(manifest).datasets
            for s in wds.DataPipeline(wds.SimpleShardList(d.urls), wds.tarfile_to_samples())]


def traced(batch, fn, out: str, **kw):
    """A shuffle-part function run under tracemalloc on its Ray worker; its peak and row count go to a file."""
    import json
    import tracemalloc as tm
    tm.start()
    result = fn(batch, **kw)
    peak = tm.get_traced_memory()[1]
    tm.stop()
    with open(os.path.join(out, f"{os.getpid()}-{uuid.uuid4().hex}.json"), "w") as f:
        json.dump({"peak": peak, "rows": len(batch["key"])}, f)
    return result


def dedup_memory(manifest: Path, backend, scratch: Path) -> dict:
    """The near-dedup's own peak memory on one input: the in-process reduce, or (with a backend) the
    busiest shuffle-part call and the driver during `dedup_removed` (exact + near, defaults)."""
    import json
    cfg = DedupConfig()
    entries = load_manifest(manifest).datasets
    signer = Signer(cfg)
    tracemalloc.start()
    if backend is None:
        signed = map_samples(entries, partial(signature_of, signer))
        removed = removed_in_memory(((rank, sig) for rank, _, sig in signed if isinstance(sig, Signature)), cfg)
        out = {"peak": tracemalloc.get_traced_memory()[1]}
        tracemalloc.stop()
        return {**out, "removed": len(removed)}
    from omni.curate import ray_backend, ray_groups
    parts = scratch / uuid.uuid4().hex
    parts.mkdir(parents=True)
    real = ray_backend.bucket_part, ray_backend.exact_part
    ray_backend.bucket_part = partial(traced, fn=ray_groups.bucket_part, out=str(parts))
    ray_backend.exact_part = partial(traced, fn=ray_groups.exact_part, out=str(parts))
    try:
        removed = backend.dedup_removed(entries, cfg)
        driver = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        ray_backend.bucket_part, ray_backend.exact_part = real
    calls = [json.loads(f.read_text()) for f in parts.iterdir()]
    per_shard: dict = {}
    for e, s, _ in removed:
        per_shard[(e, s)] = per_shard.get((e, s), 0) + 1
    return {"peak": max(c["peak"] for c in calls), "rows": max(c["rows"] for c in calls), "driver": driver,
            "removed": len(removed), "set_bytes": len(pickle.dumps(frozenset(removed))),
            "shard_bytes": 8 * max(per_shard.values(), default=0)}


def run_mode(mode: str, cpus: int, inputs: dict, root: Path, steps: list[str]) -> dict:
    """Every measurement of one mode ('in-process' or 'ray'); Ray gets `cpus` CPUs."""
    backend = None
    if mode == "ray":
        import ray

        from omni.curate.ray_backend import RayBackend, RayOptions
        from omni.curate.ray_write import ShardDatasink
        backend = RayBackend(RayOptions(address="local", num_cpus=cpus, object_store_bytes=300 << 20))
        ray.data.range(4 * cpus, override_num_blocks=4 * cpus).map(lambda r: r).materialize()  # start the workers
        real_commit = ShardDatasink.on_write_complete

        def timed_commit(self, result) -> None:   # the driver's fold of the light rows + the renames
            t = time.perf_counter()
            try:
                real_commit(self, result)
            finally:
                COMMIT["seconds"] += time.perf_counter() - t
        ShardDatasink.on_write_complete = timed_commit
    tag = "in-process" if backend is None else f"ray-{cpus}"
    out = {"mode": tag}
    build_cfg = partial(BuildConfig, format="llava", inputs=[str(inputs["build"])], name="bench",
                        media_root=str(inputs["build"].parent), samples_per_shard=PER_SHARD)
    try:  # untimed first pass: the workers import the verbs' modules and build the MinHash permutations
        if "memory" in steps and (backend is None or cpus == 2):
            for label, manifest in inputs["memory"].items():
                out[f"memory-{label}"] = dedup_memory(manifest, backend, root / "parts")
        if "dedup" in steps:
            dedup(inputs["warm"], root / tag / "warm", DedupConfig(), progress=False, backend=backend)
        elif "build" in steps:
            build(build_cfg(out_dir=str(root / tag / "warm")), progress=False, backend=backend)
        for label, manifest in inputs["dedup"].items():
            COMMIT["seconds"] = 0.0
            with PeakMemory() as mem:
                d = dedup(manifest, root / tag / f"dedup-{label}", DedupConfig(), samples_per_shard=PER_SHARD,
                          progress=False, backend=backend)
            out[f"dedup-{label}"] = {"samples": d.total_input, "seconds": d.seconds, "driver": mem.driver,
                                     "worker": mem.worker, "kept": kept_keys(d.manifest), "commit": COMMIT["seconds"]}
        if "build" not in steps:
            return out
        COMMIT["seconds"] = 0.0
        with PeakMemory() as mem:
            b = build(build_cfg(out_dir=str(root / tag / "build")), progress=False, backend=backend)
        out["build"] = {"samples": b.written + b.rejected, "seconds": b.seconds, "driver": mem.driver,
                        "worker": mem.worker, "kept": kept_keys(b.manifest), "commit": COMMIT["seconds"]}
    finally:
        if backend is not None:
            backend.close()
            ShardDatasink.on_write_complete = real_commit
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="text samples of the small dedup input (the large is 4x)")
    ap.add_argument("--build-n", type=int, default=400, help="LLaVA records to build")
    ap.add_argument("--nodes", default="1,10,100", help="node counts of the projection")
    ap.add_argument("--cores-per-node", type=int, default=32, help="worker CPUs per node in the projection")
    ap.add_argument("--mem-n", type=int, default=2000, help="text samples of the small memory input (the large is 4x)")
    ap.add_argument("--steps", default="dedup,build,memory", help="comma-separated: dedup, build, memory")
    args = ap.parse_args()
    steps = args.steps.split(",")
    if not steps or set(steps) - {"dedup", "build", "memory"}:
        ap.error(f"--steps {args.steps!r}: a comma-separated list of dedup, build, memory")
    timed = [s for s in ("dedup-1x", "dedup-4x") if "dedup" in steps] + ["build"] * ("build" in steps)
    root = Path(tempfile.mkdtemp(prefix="omni-curation-scale-"))
    try:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
              f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
        inputs = {"dedup": {}, "memory": {}, "build": make_llava(root / "llava", args.build_n),
                  "warm": make_text_shards(root / "warm", 2 * PER_SHARD // 5, per_shard=PER_SHARD // 5)}
        for label, n in (("1x", args.n), ("4x", 4 * args.n)) if "dedup" in steps else ():
            inputs["dedup"][label] = make_text_shards(root / f"text-{label}", n, per_shard=PER_SHARD)
        for label, n in (("1x", args.mem_n), ("4x", 4 * args.mem_n)) if "memory" in steps else ():
            inputs["memory"][label] = make_text_shards(root / f"mem-{label}", n, per_shard=PER_SHARD)
        cpus = (0, 1, 2) if timed else (0, 2)
        results = [run_mode("in-process" if c == 0 else "ray", c, inputs, root, steps) for c in cpus]
        base = results[0]
        for r in results[1:]:
            for step in timed:
                assert r[step]["kept"] == base[step]["kept"], f"{r['mode']} {step}: other samples kept than in-process"
        print(f"\n{'step':<10} {'mode':<11} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'x in-proc':>9} "
              f"{'driver MB':>10} {'worker MB':>10}")
        for step in timed:
            for r in results:
                m = r[step]
                rate = m["samples"] / m["seconds"]
                ratio = rate / (base[step]["samples"] / base[step]["seconds"])
                worker = f"{m['worker'] / 2**20:>10.0f}" if r is not base else f"{'-':>10}"
                print(f"{step:<10} {r['mode']:<11} {m['samples']:>8} {m['seconds']:>8.2f} {rate:>10.0f} "
                      f"{ratio:>9.2f} {m['driver'] / 2**20:>10.0f} {worker}")
        print("\npeak memory as the dedup input grows 4x (4x / 1x):" if "dedup" in steps else "")
        for r in results if "dedup" in steps else ():
            who = "driver (all work)" if r is base else "busiest worker"
            key = "driver" if r is base else "worker"
            print(f"  {r['mode']:<11} {who:<18} {r['dedup-4x'][key] / max(r['dedup-1x'][key], 1):.2f}"
                  + ("" if r is base else f"   driver {r['dedup-4x']['driver'] / max(r['dedup-1x']['driver'], 1):.2f}"))
        if "memory" in steps:
            print(f"\nthe near-dedup's own memory (tracemalloc peaks, MB) as the input grows 4x "
                  f"({args.mem_n} -> {4 * args.mem_n} samples, {PER_SHARD} a shard):")
            print(f"{'input':<6} {'in-process reduce':>18} {'Ray busiest part':>17} {'rows':>7} {'Ray driver':>11} "
                  f"{'removed':>8} {'removed set':>12} {'one shard':>10}")
            here, ray2 = results[0], results[-1]
            for label in ("1x", "4x"):
                h, r = here[f"memory-{label}"], ray2[f"memory-{label}"]
                assert h["removed"] == r["removed"], "Ray removed other samples than in-process"
                print(f"{label:<6} {h['peak'] / 1e6:>18.1f} {r['peak'] / 1e6:>17.2f} {r['rows']:>7} "
                      f"{r['driver'] / 1e6:>11.1f} {r['removed']:>8} {r['set_bytes'] / 1e3:>10.1f}kB "
                      f"{r['shard_bytes'] / 1e3:>8.1f}kB")
            ratio = lambda m, k: m["memory-4x"][k] / max(m["memory-1x"][k], 1)  # noqa: E731
            print(f"4x / 1x: in-process reduce {ratio(here, 'peak'):.2f}; Ray busiest part {ratio(ray2, 'peak'):.2f} "
                  f"(rows {ratio(ray2, 'rows'):.2f}); Ray driver {ratio(ray2, 'driver'):.2f}; removed set "
                  f"{ratio(ray2, 'set_bytes'):.2f}, a shard's positions {ratio(ray2, 'shard_bytes'):.2f}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        two = results[-1]
        if timed:
            print(f"\nCOMPUTED projection for {TARGET / 1e6:.0f}M samples ({args.cores_per_node} worker CPUs per "
                  "node; per worker CPU = the ray-2 rate without the driver's commit / 2; the commit (the verb's "
                  "fold of the light rows + renames, measured on the driver) starts when the last write task ends, "
                  "so its time adds at any cluster size):")
        for step in [s for s in timed if s != "dedup-1x"]:
            m = two[step]
            per_worker = m["samples"] / max(m["seconds"] - m["commit"], 1e-9) / 2
            fold_h = TARGET / (m["samples"] / max(m["commit"], 1e-9)) / 3600
            for nodes in (int(x) for x in args.nodes.split(",")):
                workers = per_worker * nodes * args.cores_per_node
                print(f"  {step.split('-')[0]:<6} {nodes:>4} node(s): workers {workers:>9.0f} samples/s -> "
                      f"{TARGET / workers / 3600:>7.1f} h + driver commit {fold_h:.1f} h (computed, not measured)")
            print(f"  {step.split('-')[0]:<6} driver commit measured: {m['commit']:.3f} s for {m['samples']} samples")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

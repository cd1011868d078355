"""Curation beyond one process: `omni data dedup` and `omni data build` in-process vs on Ray Data.

    python bench/curation_scale.py                      # dedup on 1000 and 4000 text samples, build on 400 LLaVA records
    python bench/curation_scale.py --n 4000 --build-n 2000
    python bench/curation_scale.py --steps build         # build only (a few minutes on a loaded machine)

Side by side in one run, on the same generated input (bench/curation_throughput.py's generators):
  - samples/s of dedup (exact + near, defaults) and build (LLaVA, media decoded) in-process, on a
    local Ray instance with 1 worker CPU and with 2 (`RayBackend`, the `--ray` path: shards read by
    Ray Data's WebDataset datasource and written by the workers, renamed by the driver);
  - peak memory (USS: the pages only that process holds) of the busiest Ray worker and of the
    driver, polled every 0.2 s, as the dedup input grows 4x (same shard size, so 4x the shards);
    a process's baseline (Python, numpy, torch imported by the loader) is most of it at these sizes;
  - a COMPUTED projection for 200M samples on N nodes from the measured per-worker rates (the
    driver still takes one light row per sample for its reports and counts: not measured apart).
The outputs of every mode are compared (kept keys) so the rates are for the same work.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import psutil
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curation_throughput import make_llava, make_text_shards  # noqa: E402

from omni.curate.build import BuildConfig, build  # noqa: E402
from omni.curate.dedup import DedupConfig, dedup  # noqa: E402
from omni.data.manifest import load_manifest  # noqa: E402

PER_SHARD = 500          # input and output shard size: a Ray read task per input shard
TARGET = 200_000_000     # samples, for the projection


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


def run_mode(mode: str, cpus: int, inputs: dict, root: Path, steps: list[str]) -> dict:
    """Every measurement of one mode ('in-process' or 'ray'); Ray gets `cpus` CPUs."""
    backend = None
    if mode == "ray":
        import ray

        from omni.curate.ray_backend import RayBackend, RayOptions
        backend = RayBackend(RayOptions(address="local", num_cpus=cpus, object_store_bytes=300 << 20))
        ray.data.range(4 * cpus, override_num_blocks=4 * cpus).map(lambda r: r).materialize()  # start the workers
    tag = "in-process" if backend is None else f"ray-{cpus}"
    out = {"mode": tag}
    build_cfg = partial(BuildConfig, format="llava", inputs=[str(inputs["build"])], name="bench",
                        media_root=str(inputs["build"].parent), samples_per_shard=PER_SHARD)
    try:  # untimed first pass: the workers import the verbs' modules and build the MinHash permutations
        if "dedup" in steps:
            dedup(inputs["warm"], root / tag / "warm", DedupConfig(), progress=False, backend=backend)
        else:
            build(build_cfg(out_dir=str(root / tag / "warm")), progress=False, backend=backend)
        for label, manifest in inputs["dedup"].items():
            with PeakMemory() as mem:
                d = dedup(manifest, root / tag / f"dedup-{label}", DedupConfig(), samples_per_shard=PER_SHARD,
                          progress=False, backend=backend)
            out[f"dedup-{label}"] = {"samples": d.total_input, "seconds": d.seconds, "driver": mem.driver,
                                     "worker": mem.worker, "kept": kept_keys(d.manifest)}
        if "build" not in steps:
            return out
        with PeakMemory() as mem:
            b = build(build_cfg(out_dir=str(root / tag / "build")), progress=False, backend=backend)
        out["build"] = {"samples": b.written + b.rejected, "seconds": b.seconds, "driver": mem.driver,
                        "worker": mem.worker, "kept": kept_keys(b.manifest)}
    finally:
        if backend is not None:
            backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="text samples of the small dedup input (the large is 4x)")
    ap.add_argument("--build-n", type=int, default=400, help="LLaVA records to build")
    ap.add_argument("--nodes", default="1,10,100", help="node counts of the projection")
    ap.add_argument("--cores-per-node", type=int, default=32, help="worker CPUs per node in the projection")
    ap.add_argument("--steps", default="dedup,build", help="comma-separated: dedup, build")
    args = ap.parse_args()
    steps = args.steps.split(",")
    if not steps or set(steps) - {"dedup", "build"}:
        ap.error(f"--steps {args.steps!r}: a comma-separated list of dedup, build")
    timed = [s for s in ("dedup-1x", "dedup-4x") if "dedup" in steps] + ["build"] * ("build" in steps)
    root = Path(tempfile.mkdtemp(prefix="omni-curation-scale-"))
    try:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
              f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
        inputs = {"dedup": {}, "build": make_llava(root / "llava", args.build_n),
                  "warm": make_text_shards(root / "warm", 2 * PER_SHARD // 5, per_shard=PER_SHARD // 5)}
        for label, n in (("1x", args.n), ("4x", 4 * args.n)) if "dedup" in steps else ():
            inputs["dedup"][label] = make_text_shards(root / f"text-{label}", n, per_shard=PER_SHARD)
        results = [run_mode("in-process", 0, inputs, root, steps), run_mode("ray", 1, inputs, root, steps),
                   run_mode("ray", 2, inputs, root, steps)]
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
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        two = results[2]
        print(f"\nCOMPUTED projection for {TARGET / 1e6:.0f}M samples ({args.cores_per_node} worker CPUs per node; "
              "per-worker rate = ray-2 rate / 2; the workers write the shards, the driver takes a light row "
              "per sample, not measured apart):")
        for step in [s for s in timed if s != "dedup-1x"]:
            per_worker = two[step]["samples"] / two[step]["seconds"] / 2
            for nodes in (int(x) for x in args.nodes.split(",")):
                workers = per_worker * nodes * args.cores_per_node
                print(f"  {step.split('-')[0]:<6} {nodes:>4} node(s): workers {workers:>9.0f} samples/s -> "
                      f"{TARGET / workers / 3600:>7.1f} h (computed, not measured)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

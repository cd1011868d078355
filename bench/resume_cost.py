"""What a resume's data position costs: restoring a training stream at a small and at a large
consumed position, then taking the next item, for each stream kind, side by side in one run.

Usage: python bench/resume_cost.py [--small 40] [--large 100000] [--manifest-large 20000] [--rounds 3]
`data.records` (RecordStream) seeks to its position; manifest streams (partition sample:
MixtureStream, partition shard: ShardStream) draw their consumed samples again as references into
the shards' indexes (omni/data/tar_index.py), reading no tar data, and read the next sample at its
offset. Prints the median seconds at each position and the ratio large / small.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from omni.data.loader import SkipCounter
from omni.data.manifest import load_manifest
from omni.data.sharded import ShardStream
from omni.data.stream import MixtureStream, RecordStream
from omni.data.synth import SynthConfig, write_corpus


def key(raw: dict) -> str:
    return raw["__key__"]


def resume_s(build, state, rounds: int) -> float:
    """Median seconds of build() + restore(state) + the first take (one more round first, not counted:
    imports, file cache)."""
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        stream = build()
        stream.restore([state])
        stream.take(1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=40, help="consumed positions of the early resume (~step 10)")
    ap.add_argument("--large", type=int, default=100_000, help="consumed positions of the late resume, records")
    ap.add_argument("--manifest-large", type=int, default=20_000, help="the same for the manifest streams")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_corpus(SynthConfig(out_dir=f"{tmp}/synth", train_per_task=200, val_per_task=4,
                                            samples_per_shard=50), progress=False)
        entries = load_manifest(manifest).select("train", None)
        weights = [e.weight for e in entries]
        records = [{"i": i, "__where__": f"line {i}"} for i in range(5000)]
        kinds = {
            "records (seek)": (lambda: RecordStream(records, 0, lambda r: r, SkipCounter()), args.large,
                               lambda n: {"world_size": 1, "rank": 0, "frontier": 0, "done": [], "next": n}),
            "partition sample (seek)": (
                lambda: MixtureStream(entries, weights, 0, 100, key, SkipCounter()), args.manifest_large,
                lambda n: {"world_size": 1, "rank": 0, "frontier": 0, "done": [], "next": n}),
            "partition shard (seek)": (
                lambda: ShardStream(entries, weights, seed=0, shuffle_buffer=100, resample=True, make=key,
                                    counter=SkipCounter()), args.manifest_large,
                lambda n: {"workers": 0, "consumed": [n], "next": 0}),
        }
        print(f"{'stream':<27} {'positions':>17} {'s small':>9} {'s large':>9} {'ratio':>8}")
        for name, (build, large, state) in kinds.items():
            small_s = resume_s(build, state(args.small), args.rounds)
            large_s = resume_s(build, state(large), args.rounds)
            print(f"{name:<27} {f'{args.small} / {large}':>17} {small_s:>9.4f} {large_s:>9.4f} "
                  f"{large_s / small_s:>8.1f}", flush=True)


if __name__ == "__main__":
    main()

"""What a resume's data position costs: restoring a training stream at a small and at a large
consumed position, then taking the next item, for each stream kind, side by side in one run.

Usage: python bench/resume_cost.py [--small 40] [--large 100000] [--manifest-large 20000] [--rounds 3]
`data.records` (RecordStream) seeks to its position. The manifest streams (partition sample:
MixtureStream, partition shard: ShardStream) seek by setting the pipeline state their position
holds (omni/data/pipeline.py) and read the next sample at its offset; `replay` is the same
position without that state (a checkpoint written before it, or shards read as bytes), which
draws every consumed sample again as a reference. The positions come from real runs of the
streams (not timed). Prints the median seconds at each position (the two positions measured in
turns) and the ratio large / small; then what keeping the position costs during training: a
sample drawn with and without a `state()` after it (the feeder takes one per micro-batch,
`partition: shard`'s decode workers one per 16 items) and the state's pickled size.
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
import timeit

from omni.data.loader import SkipCounter
from omni.data.manifest import load_manifest
from omni.data.sharded import ShardStream
from omni.data.stream import MixtureStream, RecordStream
from omni.data.synth import SynthConfig, write_corpus

STATE_KEYS = ("reader", "readers")  # the pipeline state in a position (MixtureStream, ShardStream)


def key(raw: dict) -> str:
    return raw["__key__"]


def resume_s(build, states: list, rounds: int) -> list[float]:
    """Median seconds of build() + restore(state) + the first take, for each state; the states take
    turns round by round, so a change in the machine's load hits all alike (one more round first,
    not counted: imports, file cache)."""
    times: list[list[float]] = [[] for _ in states]
    for _ in range(rounds + 1):
        for state, own in zip(states, times):
            t0 = time.perf_counter()
            stream = build()
            stream.restore([state])
            stream.take(1)
            own.append(time.perf_counter() - t0)
    return [statistics.median(own[1:]) for own in times]


def position(build, n: int) -> dict:
    """The stream's position after taking n items (what a checkpoint there holds)."""
    stream = build()
    stream.take(n)
    return stream.state()


def without_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in STATE_KEYS}


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

        def mixture():
            return MixtureStream(entries, weights, 0, 100, key, SkipCounter())

        def shards():
            return ShardStream(entries, weights, seed=0, shuffle_buffer=100, resample=True, make=key,
                               counter=SkipCounter())

        rows = [("records (seek)", lambda: RecordStream(records, 0, lambda r: r, SkipCounter()), args.large,
                 lambda n: {"world_size": 1, "rank": 0, "frontier": 0, "done": [], "next": n})]
        for name, build in (("partition sample", mixture), ("partition shard", shards)):
            at = {n: position(build, n) for n in (args.small, args.manifest_large)}
            rows.append((f"{name} (seek)", build, args.manifest_large, at.get))
            rows.append((f"{name} (replay)", build, args.manifest_large,
                         lambda n, at=at: without_state(at[n])))
        print(f"{'stream':<27} {'positions':>15} {'s small':>9} {'s large':>9} {'ratio':>8}")
        for name, build, large, state in rows:
            small_s, large_s = resume_s(build, [state(args.small), state(large)], args.rounds)
            print(f"{name:<27} {f'{args.small} / {large}':>15} {small_s:>9.4f} {large_s:>9.4f} "
                  f"{large_s / small_s:>8.1f}", flush=True)
        stream = mixture()
        stream.take(args.small)
        mixer = stream.samples  # the pipeline both manifest streams run (omni/data/pipeline.py)

        def us(fn) -> float:
            return statistics.median(timeit.repeat(fn, number=200, repeat=5)) / 200 * 1e6

        state = mixer.state()
        print(f"\nthe pipeline's state while training ({len(entries)} datasets, shuffle buffer 100): a sample drawn "
              f"{us(lambda: next(mixer)):.1f} us, drawn + state() {us(lambda: (next(mixer), mixer.state())):.1f} us; "
              f"{len(pickle.dumps(state)) / 1024:.1f} KiB pickled in {us(lambda: pickle.dumps(state)):.0f} us")


if __name__ == "__main__":
    main()

"""One rank's training stream: data.partition sample vs shard (0 and 2 decode workers).

Usage: python bench/data_partition.py [--world 4] [--samples 600] [--rounds 3] [--shuffle-buffer 50]
Writes a synthetic corpus, then reads rank 0 of `--world` simulated ranks under each mode in one
run: examples/s (decoded and processed by the tiny model's processor) and the shard bytes the rank
read (counted at the file reads, DataLoader workers included) per 1000 examples it got. Timing
starts after a warm-up long enough to fill the shuffle buffers (until then every example reads
two samples; a small buffer keeps that short); the modes take turns for `--rounds` rounds and the
median rate is printed, so load from other jobs falls on all of them alike.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from urllib.parse import urlparse

import torch
import webdataset as wds

from omni.data.loader import SkipCounter, decode_sample
from omni.data.manifest import load_manifest
from omni.data.sharded import ShardStream
from omni.data.stream import MixtureStream
from omni.data.synth import SynthConfig, write_corpus
from omni.model.omni_model import OmniModel
from omni.model.processor import OmniProcessor
from omni.presets import build_preset

READ = multiprocessing.Value("q", 0)  # shard bytes read, by this process and its forked workers


class CountedFile:
    """A shard file that adds what is read from it to READ."""

    def __init__(self, path: str):
        self.file = open(path, "rb")  # noqa: SIM115 - closed by webdataset through close()

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        with READ.get_lock():
            READ.value += len(data)
        return data

    def close(self) -> None:
        self.file.close()


def open_counted(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> CountedFile:
    """webdataset opener for counted:PATH urls."""
    return CountedFile(urlparse(url).path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4, help="simulated ranks (rank 0 is measured)")
    ap.add_argument("--samples", type=int, default=600, help="examples timed per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shuffle-buffer", type=int, default=50)
    ap.add_argument("--per-task", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in each DataLoader worker: the modes differ by processes, not threads
    wds.gopen_schemes["counted"] = open_counted
    model, tok = OmniModel.from_config(build_preset("tiny"))
    processor = OmniProcessor.from_config(model.config, tok, model.token_ids)

    def make(raw):
        _, messages, media = decode_sample(raw)
        return processor(messages, media)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(out_dir=tmp, train_per_task=args.per_task, val_per_task=1, samples_per_shard=25)
        entries = load_manifest(write_corpus(cfg, progress=False)).select("train")
        for e in entries:
            e.urls = "counted:" + e.urls
        weights = [e.weight for e in entries]
        common = {"make": make, "rank": 0, "world_size": args.world}
        shard = {**common, "seed": 0, "shuffle_buffer": args.shuffle_buffer, "resample": True}
        streams = {"sample": MixtureStream(entries, weights, 0, args.shuffle_buffer, counter=SkipCounter(), **common),
                   "shard, workers 0": ShardStream(entries, weights, counter=SkipCounter(), workers=0, **shard),
                   "shard, workers 2": ShardStream(entries, weights, counter=SkipCounter(), workers=2, **shard)}
        modes = list(streams)
        for stream in streams.values():
            stream.take(4 * len(entries) * args.shuffle_buffer)  # every worker's buffers full
        rates, read = {name: [] for name in modes}, dict.fromkeys(modes, 0)
        for _ in range(args.rounds):
            for name, stream in streams.items():
                read0, t0 = READ.value, time.perf_counter()
                stream.take(args.samples)
                rates[name].append(args.samples / (time.perf_counter() - t0))
                read[name] += READ.value - read0
    print(f"rank 0 of {args.world}, {len(entries)} datasets, {args.rounds} x {args.samples} examples per mode")
    print(f"{'partition':<22}{'examples/s':>11}{'MB read / 1000 examples':>26}")
    for name in modes:
        per_1000 = read[name] / (args.rounds * args.samples) * 1000 / 1e6
        print(f"{name:<22}{statistics.median(rates[name]):>11.1f}{per_1000:>26.1f}")


if __name__ == "__main__":
    main()

"""Packing efficiency (real tokens / tokens computed): padded micro-batches vs packed ones.

Usage: python bench/packing_efficiency.py [--micro-batch 32]
A padded micro-batch computes micro_batch x its longest sample; a packed one (omni/data/packing.py)
is one row of its samples back to back, built here by `collate_packed` itself. Measures on (a) the
tiny synthetic corpus, tokenised by the tiny model's processor, and (b) a skewed (log-normal) length
mix, both in one run, and prints the ratio side by side.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from omni.data.loader import SkipCounter, decode_sample, split_stream
from omni.data.manifest import load_manifest
from omni.data.packing import collate_packed
from omni.data.synth import SynthConfig, write_corpus
from omni.model.batch import MediaBatch
from omni.model.omni_model import OmniModel
from omni.model.processor import Example, OmniProcessor
from omni.presets import build_preset


def fills(lengths: list[int], micro_batch: int) -> tuple[float, float]:
    padded = packed = 0
    for i in range(0, len(lengths) - micro_batch + 1, micro_batch):
        chunk = lengths[i: i + micro_batch]
        padded += max(chunk) * len(chunk)
        row, _ = collate_packed([Example(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                                         MediaBatch()) for n in chunk])
        packed += row.input_ids.numel()
    real = sum(lengths[: len(lengths) // micro_batch * micro_batch])
    return real / padded, real / packed


def synth_lengths(n_per_task: int) -> list[int]:
    model, tok = OmniModel.from_config(build_preset("tiny"))
    proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(write_corpus(SynthConfig(out_dir=tmp, train_per_task=n_per_task, val_per_task=1),
                                              progress=False))
        lengths = []
        for entry in manifest.select("train"):
            for raw in split_stream(entry, SkipCounter()):
                _, messages, media = decode_sample(raw)
                lengths.append(len(proc(messages, media).input_ids))
    np.random.default_rng(0).shuffle(lengths)  # the training mixture interleaves tasks
    return lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--per-task", type=int, default=64)
    args = ap.parse_args()
    skewed = [int(x) for x in np.clip(np.random.default_rng(0).lognormal(4.0, 0.8, 4096), 8, 2048)]
    print(f"{'mix':<22}{'padded fill':>12}{'packed fill':>12}{'ratio':>8}")
    for name, lengths in (("synthetic corpus", synth_lengths(args.per_task)), ("skewed (log-normal)", skewed)):
        pad, pack = fills(lengths, args.micro_batch)
        print(f"{name:<22}{pad:>12.3f}{pack:>12.3f}{pack / pad:>8.2f}x")


if __name__ == "__main__":
    main()

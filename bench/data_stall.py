"""Data stall inside real training runs: the share of step time the step waits for its data
(metrics.jsonl `data_wait`), with micro-batches made ahead (`data.prefetch: 2`, the default) vs
made when the step asks (`data.prefetch: 0`), for the tiny image-, video- and audio-heavy stages.

Usage: python bench/data_stall.py [--steps 30] [--rounds 2] [--micro-batch 32] [--partition shard --workers 1]
Writes a synthetic corpus, then trains each stage from a random-init tiny model with both settings,
taking turns for `--rounds` rounds so load from other jobs falls on both alike. Prints per stage the
median data_wait fraction and s/step of each setting and their ratio. `--partition shard --workers N`
runs the 7B stages' data path (stages/7b: partition shard, decode workers) scaled down.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from omni.data.synth import SynthConfig, write_corpus
from omni.train.config import load_stage
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"image": "1b_image_vit.yaml", "video": "1d_video.yaml", "audio": "1e_audio.yaml"}


def run(stage: str, manifest: str, out: Path, prefetch: int, args) -> tuple[float, float]:
    """(data_wait fraction, s/step) of one run, the first log window (warm-up) left out."""
    extra = [f"data.partition={args.partition}"] + ([f"data.workers={args.workers}"] if args.partition == "shard" else [])
    cfg = load_stage(ROOT / "stages/tiny" / STAGES[stage],
                     [f"data.manifest={manifest}", "init_from=null", f"steps={args.steps}",
                      f"batch.micro_batch={args.micro_batch}", f"data.prefetch={prefetch}", "log.interval=5",
                      "checkpoint.interval=0", "eval_interval=0", *extra])
    train_stage(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = rows[-1]["elapsed_s"] - json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["elapsed_s"]
    waits = [r["data_wait"] for r in rows]
    return statistics.mean(waits), seconds / (args.steps - 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--partition", choices=["sample", "shard"], default="sample")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--stages", default="image,video,audio")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = str(write_corpus(SynthConfig(out_dir=f"{tmp}/synth", train_per_task=200, val_per_task=4,
                                                samples_per_shard=50), progress=False))
        print(f"torch threads {torch.get_num_threads()}, {args.steps} steps x micro-batch {args.micro_batch}, "
              f"partition {args.partition}" + (f", workers {args.workers}" if args.partition == "shard" else ""))
        print(f"{'stage':<6} {'wait inline':>12} {'wait ahead':>11} {'s/step inline':>14} {'s/step ahead':>13} "
              f"{'wait ratio':>11} {'time ratio':>11}")
        for stage in args.stages.split(","):
            got: dict[int, list[tuple[float, float]]] = {0: [], 2: []}
            for r in range(args.rounds):
                for prefetch in (0, 2):
                    got[prefetch].append(run(stage, manifest, Path(tmp) / f"{stage}-{prefetch}-{r}", prefetch, args))
            (w0, s0), (w2, s2) = ((statistics.median(x[0] for x in got[p]), statistics.median(x[1] for x in got[p]))
                                  for p in (0, 2))
            print(f"{stage:<6} {w0:>12.1%} {w2:>11.1%} {s0:>14.3f} {s2:>13.3f} {w2 / max(w0, 1e-9):>11.3f} "
                  f"{s2 / s0:>11.3f}", flush=True)


if __name__ == "__main__":
    main()

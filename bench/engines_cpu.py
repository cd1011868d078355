"""Every training engine on the same tiny stage, side by side: loss parity and step time.

Usage: python bench/engines_cpu.py [--steps 20] [--nproc 2]
Writes the tiny synthetic corpus, then runs stages/tiny/2_sft.yaml (all parameters trainable)
once per engine: 1 process x micro-batch 4 on ddp (the reference), and `nproc` processes x
micro-batch 4/nproc on ddp, fsdp2, deepspeed ZeRO-2 and ZeRO-3 (gloo on CPU, NCCL on GPUs; the
DeepSpeed rows are skipped when deepspeed is not installed). Prints, per engine, the largest
loss difference to the reference over the run and to the one-process DeepSpeed run (a modality
absent from a whole step still gets a zero-gradient AdamW update under ZeRO, see
docs/decisions.md), the median seconds per step and LLM tokens/s (`log.profile`).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from omni.data.synth import SynthConfig, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, manifest: Path, steps: int, nproc: int, *extra: str) -> list[dict]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc), "--master_port",
                                                    str(29500 + os.getpid() % 500)]
    cmd = launcher + ["-m", "omni.cli", "-q", "train", str(ROOT / "stages/tiny/2_sft.yaml"), "--out", str(out),
                      f"data.manifest={manifest}", "init_from=null", f"steps={steps}", "log.interval=1",
                      "data.shuffle_buffer=20", "optim.lr=3e-3", "log.profile=true", *extra]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    micro = 4 // args.nproc
    engines = {"ddp": ["engine=ddp"], "fsdp2": ["engine=fsdp2"]}
    if importlib.util.find_spec("deepspeed") is not None:
        engines |= {"deepspeed zero2": ["engine=deepspeed", "zero_stage=2"],
                    "deepspeed zero3": ["engine=deepspeed", "zero_stage=3"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_corpus(SynthConfig(out_dir=str(tmp / "synth"), train_per_task=48, val_per_task=4,
                                            samples_per_shard=24), progress=False)
        ref = run(tmp / "ref", manifest, args.steps, 1, "batch.micro_batch=4")
        ds_ref = run(tmp / "ds_ref", manifest, args.steps, 1, "batch.micro_batch=4", *engines["deepspeed zero2"]) \
            if "deepspeed zero2" in engines else None
        print(f"tiny 2_sft, {args.steps} steps, reference: 1 process x micro-batch 4 (ddp); "
              f"others: {args.nproc} processes x micro-batch {micro}")
        print(f"{'engine':<18}{'max |dloss| vs ddp x1':>24}{'vs deepspeed x1':>18}{'s/step':>9}{'tokens/s':>10}")
        for name, extra in engines.items():
            rows = run(tmp / name.replace(" ", "_"), manifest, args.steps, args.nproc, f"batch.micro_batch={micro}",
                       *extra)
            d_ref = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref))
            d_ds = f"{max(abs(a['loss'] - b['loss']) for a, b in zip(rows, ds_ref)):.1e}" if ds_ref else "-"
            times = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(rows)]
            tps = statistics.median(r["tokens_per_s"] for r in rows[1:])
            print(f"{name:<18}{d_ref:>24.1e}{d_ds:>18}{statistics.median(times):>9.3f}{tps:>10.0f}")


if __name__ == "__main__":
    main()

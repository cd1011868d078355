"""Model-FLOPs utilisation on this CPU: the `small` preset's training step vs the machine's own matmul peak.

Usage: python bench/mfu.py [--steps 6] [--tokens 1024] [--micro-batch 1] [--threads N] [--no-compile]
                           [--profile-steps 0] [--train-bf16]
1. Peak: torch.matmul of two large square matrices (best of several) per dtype, fp32 (2048^2) and
   bf16 (1024^2: on a CPU without bf16 units it is slow), with the threads training uses: the most
   this machine's matmul library gives. A dtype under 0.2x fp32's peak is not trained (`--train-bf16`).
2. Training: `omni train`'s own loop (omni.train.trainer.train_stage, ddp engine, one process) on the
   `small` preset (Qwen2-7B proportions, random init, LLM trainable), `log.profile` on, on synthetic
   text chats of `--tokens` tokens each, in fp32 and in bf16 (autocast), then the faster of the two
   with `compile: true`. MFU = the trainer's model TFLOP/s (omni/train/flops.py, PaLM's count) over
   the second half of the steps (the first half warms up, compiles) / that dtype's measured peak.
3. Profile (`--profile-steps N`): the faster eager run again under torch.profiler for `--profile-steps`
   steps after two warm-up steps; the steps' wall time split into attention (SDPA forward and
   backward), linear / matmul, the optimizer (AdamW, gradient clipping), the loss's log-softmax,
   autocast's dtype casts, zero fills of gradient buffers, other ops (norms, activations, element-wise),
   data (the trainer's own `data_wait`) and the rest: Python and framework overhead between ops.
Prints the CPU's matrix-extension flags (amx*, avx512_bf16): without them bf16 matmuls have no
hardware path and run slower than fp32.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omni.config import from_dict
from omni.tiny_world import vocabulary
from omni.train.config import StageConfig
from omni.train.trainer import train_stage

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
SLOW = 0.2  # a dtype whose matmul peak is below this share of fp32's is not trained (no hardware path)
TEMPLATE = 32  # the chat template's tokens around one user and one assistant turn


def cpu_model() -> tuple[str, list[str]]:
    name, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
    except OSError:
        pass
    return name, [f for f in FLAGS if f in flags]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best TFLOP/s of an n x n x n matmul in `dtype` (the first run warms the library up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def write_chats(path: Path, n: int, tokens: int) -> None:
    """`n` text chats of about `tokens` tokens (the tiny word-level tokenizer: one word, one token)."""
    rng = np.random.default_rng(0)
    words = [w for w in vocabulary() if w.isalpha()]
    with path.open("w") as f:
        for _ in range(n):
            text = rng.choice(words, size=tokens - TEMPLATE)
            user = len(text) // 4
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(text[:user])},
                                             {"role": "assistant", "content": " ".join(text[user:])}]}) + "\n")


def stage(records: Path, precision: str, steps: int, micro: int, compile: bool, peak: float) -> StageConfig:
    return from_dict(StageConfig, {
        "name": f"mfu-{precision}{'-compiled' if compile else ''}", "preset": "small", "trainable": ["llm.*"],
        "data": {"records": str(records)}, "steps": steps, "batch": {"micro_batch": micro},
        "optim": {"lr": 1e-4, "warmup_steps": 0}, "precision": precision, "compile": compile,
        "log": {"interval": max(steps // 2, 1), "profile": True, "peak_tflops": peak},
        "checkpoint": {"interval": 0}, "eval_interval": 0}, where="bench/mfu.py")


def train(cfg: StageConfig, out: Path) -> dict:
    """The trainer's last metrics row: the second half of the steps."""
    train_stage(cfg, out / cfg.name, progress=False)
    return json.loads((out / cfg.name / "metrics.jsonl").read_text().splitlines()[-1])


GROUPS = (  # op name substrings -> group, first match wins
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("optimizer", ("_foreach_", "adam", "clip_grad", "_fused_")),
    ("linear / matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("loss (log-softmax over the vocabulary)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("dtype casts (autocast's bf16 copies)", ("aten::copy_", "aten::_to_copy")),
    ("zero fills (gradient buffers)", ("aten::fill_", "aten::zero_")),
)


def profile_breakdown(cfg: StageConfig, out: Path, steps: int) -> dict[str, float]:
    """Seconds per group over `steps` profiled steps: the main thread's ops by self CPU time, data as
    the trainer's wait for batches, the rest of the window's wall time Python and framework.
    The profiler steps at each optimizer step (its pre-hook), so an op's place in the event tree can
    name the new ProfilerStep instead of the optimizer: optimizer ops are told by time, as those
    inside an `Optimizer.*` range or under clipping's foreach ops. The first two optimizer steps
    (AdamW allocating its moments) are left out of the window."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    cfg.steps = steps + 2
    cfg.log.interval = 1
    events = []
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                 on_trace_ready=lambda p: events.extend(p.events())) as prof:
        hook = register_optimizer_step_pre_hook(lambda *_: prof.step())
        try:
            train(cfg, out)
        finally:
            hook.remove()
    rows = [json.loads(line) for line in (out / cfg.name / "metrics.jsonl").read_text().splitlines()]
    main = _main_thread(events)
    mine = [e for e in events if e.thread == main]
    wall = sum(e.cpu_time_total for e in mine if e.name.startswith("ProfilerStep")) / 1e6
    optimizer = [(e.time_range.start, e.time_range.end) for e in mine if e.name.startswith("Optimizer.")]
    groups = {g: 0.0 for g, _ in GROUPS} | {"other ops": 0.0}
    for e in mine:
        if e.name.startswith(("ProfilerStep", "autograd::")):
            continue  # step markers and autograd's node wrappers: their self time is framework overhead
        name = e.name.lower()
        group = next((g for g, keys in GROUPS if any(k in name for k in keys)), "other ops")
        if any(a <= e.time_range.start < b for a, b in optimizer) or _under(e, GROUPS[1][1]):
            group = "optimizer"
        groups[group] += e.self_cpu_time_total / 1e6
    groups["data (waiting for batches)"] = wall * float(np.mean([r["data_wait"] for r in rows[-steps:]]))
    groups["Python / framework (the rest)"] = max(wall - sum(groups.values()), 0.0)
    return {"wall": wall, **groups}


def _under(event, keys) -> bool:
    """Whether an ancestor of `event` is one of the ops named by `keys` (clipping's foreach norm)."""
    event = event.cpu_parent
    while event is not None:
        if any(k in event.name.lower() for k in keys):
            return True
        event = event.cpu_parent
    return False


def _main_thread(events) -> int:
    """The thread that ran the most op time: the training loop's (the data prefetcher has its own)."""
    per_thread: dict[int, float] = {}
    for e in events:
        per_thread[e.thread] = per_thread.get(e.thread, 0.0) + e.self_cpu_time_total
    return max(per_thread, key=per_thread.get)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled run")
    ap.add_argument("--profile-steps", type=int, default=0, help="> 0: where the faster run's step time goes")
    ap.add_argument("--train-bf16", action="store_true", help="train bf16 even where its matmuls are slow")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name, flags = cpu_model()
    print(f"CPU: {name}; {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"matrix flags: {', '.join(flags) or 'none'} (bf16 units: "
          f"{'yes' if {'amx_bf16', 'avx512_bf16'} & set(flags) else 'no'})")
    peaks = {"fp32": matmul_peak(torch.float32, 2048), "bf16": matmul_peak(torch.bfloat16, 1024, repeats=2)}
    print("measured matmul peak (fp32 2048^3, bf16 1024^3): "
          + ", ".join(f"{p} {v * 1e3:.2f} GFLOP/s" for p, v in peaks.items()))
    dtypes = [p for p in DTYPES if args.train_bf16 or peaks[p] >= SLOW * peaks["fp32"]]
    for p in set(DTYPES) - set(dtypes):
        print(f"{p} not trained: its matmul peak is {peaks[p] / peaks['fp32']:.3f}x fp32's (no hardware path; "
              "--train-bf16 trains it anyway)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        records = out / "chats.jsonl"
        write_chats(records, args.steps * args.micro_batch * 4, args.tokens)
        runs = {}
        for p in dtypes:
            runs[p] = train(stage(records, p, args.steps, args.micro_batch, False, peaks[p]), out)
        fast = max(runs, key=lambda p: runs[p]["tokens_per_s"])
        if not args.no_compile:
            runs[f"{fast} compiled"] = train(stage(records, fast, args.steps, args.micro_batch, True, peaks[fast]), out)
        print(f"\n`small` preset, {args.micro_batch} x {args.tokens}-token chats per step, {args.steps} steps "
              f"(the last {args.steps - args.steps // 2} measured)")
        print(f"{'run':<14} {'tokens/s':>9} {'model GFLOP/s':>14} {'peak GFLOP/s':>13} {'MFU':>7} {'data wait':>10}")
        for run, row in runs.items():
            peak = peaks[run.split()[0]]
            print(f"{run:<14} {row['tokens_per_s']:>9.1f} {row['tflops_per_device'] * 1e3:>14.1f} "
                  f"{peak * 1e3:>13.1f} {row['mfu']:>7.1%} {row['data_wait']:>10.1%}")
        for other in (p for p in dtypes if p != fast):
            print(f"{fast} vs {other} tokens/s: {runs[fast]['tokens_per_s'] / runs[other]['tokens_per_s']:.2f}x")
        if not args.no_compile:
            print(f"compile speed-up ({fast}): "
                  f"{runs[f'{fast} compiled']['tokens_per_s'] / runs[fast]['tokens_per_s']:.2f}x")
        if args.profile_steps:
            cfg = stage(records, fast, args.steps, args.micro_batch, False, peaks[fast])
            cfg.name += "-profiled"
            parts = profile_breakdown(cfg, out, args.profile_steps)
            wall = parts.pop("wall")
            print(f"\nwhere the {fast} step's time goes ({args.profile_steps} profiled steps, {wall:.2f} s):")
            for group, seconds in parts.items():
                print(f"  {group:<32} {seconds:7.2f} s {seconds / wall:6.1%}")


if __name__ == "__main__":
    main()

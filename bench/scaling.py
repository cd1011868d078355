"""Scaling: step time and peak memory of real training steps against sequence length, video
frames, audio seconds and LLM width, with the fitted log-log exponent of each.

Usage: python bench/scaling.py [--steps 2] [--threads 1] [--plot docs/scaling.png]
Each point is one sample trained on by the trainer's pieces (bench/train_throughput.py:
stages/tiny/2_sft.yaml, random init, everything trainable, one ddp process, fp32; the SFT
objective's collate, forward and backward, AdamW step). One axis moves at a time from the tiny
preset, whose context, video frame cap and audio window cap are raised so the sweeps fit (`COMMON`):
- sequence: a text chat of about N LLM tokens;
- video frames: a `<video>` question over N 32-px frames (16 LLM tokens a frame);
- audio seconds: an `<audio>` question over N s of audio (the tiny whisper window is 1 s);
- width: the LLM's hidden size N (MLP 4N, 4 heads) on a 512-token text chat.
Each model runs in a fresh subprocess (one for the sequence, video and audio axes, one per width),
its points in order after one untimed step on a short text (so AdamW's state exists before any
point). Step time: the median of `--steps` steps after one warm-up step of the point. Peak memory:
the process's peak resident set during the point's steps (VmHWM, reset through
/proc/self/clear_refs after glibc's malloc_trim returned the freed heap) minus its resident set
then: the activations, gradients and temporaries of a step; weights and optimizer state are
outside it. Exponent: the slope of log(metric) on log(N)
(numpy.polyfit), over all points of the axis and over its last two points (the local slope at the
large end, where fixed costs weigh least).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AXES = {"sequence": [256, 512, 1024, 2048], "video frames": [2, 4, 8, 16], "audio seconds": [2, 4, 8, 16],
        "width": [128, 256, 384, 512]}
UNITS = {"sequence": "LLM tokens", "video frames": "frames", "audio seconds": "s", "width": "hidden size"}
COMMON = ["llm.hf_config.max_position_embeddings=4096", "video.max_frames=16", "audio.max_windows=16"]
WIDTH_TOKENS = 512


def log_log_exponent(xs: list[float], ys: list[float]) -> float:
    """The exponent k of y ~ x^k fitted by least squares on log-log axes."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# ---- one point, in its own process ----------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _text_chat(proc, words: list[str], tokens: int, rng):
    """A user/assistant chat of about `tokens` LLM tokens (the word count scaled once to fit)."""
    def chat(n: int):
        text = rng.choice(words, size=n)
        return proc([{"role": "user", "content": " ".join(text[:n // 3])},
                     {"role": "assistant", "content": " ".join(text[n // 3:])}], {})
    probe = chat(tokens)
    return chat(max(4, round(tokens * tokens / len(probe.input_ids))))


def _example(axis: str, value: int, proc):
    from PIL import Image

    from omni.tiny_world import vocabulary

    rng = np.random.default_rng(0)
    words = [w for w in vocabulary() if w.isalpha()]
    if axis == "video frames":
        frames = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(value)]
        return proc([{"role": "user", "content": "<video> what colour does the shape turn into?"},
                     {"role": "assistant", "content": "blue"}], {"video": [frames]})
    if axis == "audio seconds":
        audio = (rng.standard_normal(16000 * value) * 0.1).astype(np.float32)
        return proc([{"role": "user", "content": "<audio> which note is played?"},
                     {"role": "assistant", "content": "mi"}], {"audio": [audio]})
    return _text_chat(proc, words, value if axis == "sequence" else WIDTH_TOKENS, rng)


def run_model(width: int | None, points: list[tuple[str, int]], steps: int, threads: int) -> list[dict]:
    """`points` (axis, value) on one model: the tiny preset, or its LLM at hidden size `width`."""
    import ctypes

    import torch

    from train_throughput import train_step, trainer_pieces

    torch.set_num_threads(threads)
    model = list(COMMON)
    if width is not None:
        model += [f"llm.hf_config.hidden_size={width}", f"llm.hf_config.intermediate_size={4 * width}"]
    objective, engine, world, proc = trainer_pieces(["batch.micro_batch=1", f"model_overrides=[{','.join(model)}]"])
    train_step(objective, engine, world, [_example("sequence", 32, proc)])  # AdamW's state, before any point
    libc = ctypes.CDLL("libc.so.6")
    rows = []
    for axis, value in points:
        example = _example(axis, value, proc)
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _rss_kib("VmRSS")
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            train_step(objective, engine, world, [example])
            times.append(time.perf_counter() - start)
        rows.append({"axis": axis, "value": value, "tokens": len(example.input_ids),
                     "step_s": statistics.median(times[1:]), "peak_mib": (_rss_kib("VmHWM") - before) / 1024})
    world.close()
    return rows


# ---- the sweep --------------------------------------------------------------------------------
def sweep(steps: int, threads: int) -> list[dict]:
    """One subprocess per model: the tiny preset for every axis but width, then one per width."""
    models = [(None, [(axis, v) for axis, values in AXES.items() if axis != "width" for v in values])]
    models += [(w, [("width", w)]) for w in AXES["width"]]
    rows = []
    for width, points in models:
        out = subprocess.run([sys.executable, __file__, "--model", json.dumps({"width": width, "points": points}),
                              "--steps", str(steps), "--threads", str(threads)], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"model width={width} failed:\n{out.stderr[-3000:]}")
        for r in json.loads(out.stdout.strip().splitlines()[-1]):
            rows.append(r)
            print(f"  {r['axis']} {r['value']}: {r['tokens']} tokens, {r['step_s']:.3f} s/step, "
                  f"{r['peak_mib']:.0f} MiB", flush=True)
    return sorted(rows, key=lambda r: (list(AXES).index(r["axis"]), r["value"]))


def exponents(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for axis in AXES:
        pts = [r for r in rows if r["axis"] == axis]
        xs = [r["value"] for r in pts]
        out[axis] = {f"{metric} {span}": log_log_exponent(xs[-2:] if span == "top" else xs,
                                                          [r[metric] for r in (pts[-2:] if span == "top" else pts)])
                     for metric in ("step_s", "peak_mib") for span in ("all", "top")}
    return out


def tables(rows: list[dict], fits: dict) -> str:
    lines = ["| axis | value | LLM tokens | step s (median) | peak MiB above the step's start |", "|---|---|---|---|---|"]
    lines += [f"| {r['axis']} | {r['value']} {UNITS[r['axis']]} | {r['tokens']} | {r['step_s']:.3f} | "
              f"{r['peak_mib']:.0f} |" for r in rows]
    lines += ["", "| axis | range | time exponent (all / last two) | memory exponent (all / last two) |",
              "|---|---|---|---|"]
    for axis, f in fits.items():
        lines.append(f"| {axis} | {AXES[axis][0]}..{AXES[axis][-1]} {UNITS[axis]} | {f['step_s all']:.2f} / "
                     f"{f['step_s top']:.2f} | {f['peak_mib all']:.2f} / {f['peak_mib top']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(AXES), figsize=(4 * len(AXES), 3.6))
    for ax, axis in zip(axes, AXES):
        pts = [r for r in rows if r["axis"] == axis]
        xs = [r["value"] for r in pts]
        mem = ax.twinx()
        ax.loglog(xs, [r["step_s"] for r in pts], "o-", color="tab:blue",
                  label=f"step time (k={fits[axis]['step_s all']:.2f})")
        mem.loglog(xs, [r["peak_mib"] for r in pts], "s--", color="tab:orange",
                   label=f"peak memory (k={fits[axis]['peak_mib all']:.2f})")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{axis} ({UNITS[axis]})")
        ax.set_ylabel("step time, s", color="tab:blue")
        mem.set_ylabel("peak MiB", color="tab:orange")
        ax.set_title(axis)
        handles = ax.get_legend_handles_labels()[0] + mem.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    fig.suptitle("tiny preset, one training step on one sample (fp32, CPU); k: fitted log-log exponent", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/scaling.png")
    ap.add_argument("--model", help=argparse.SUPPRESS)  # one subprocess's model and points, as JSON
    args = ap.parse_args()
    if args.model:
        spec = json.loads(args.model)
        print(json.dumps(run_model(spec["width"], [tuple(p) for p in spec["points"]], args.steps, args.threads)))
        return
    start = time.perf_counter()
    rows = sweep(args.steps, args.threads)
    fits = exponents(rows)
    print(tables(rows, fits))
    plot(rows, fits, args.plot)
    print(f"plot: {args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}; "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()

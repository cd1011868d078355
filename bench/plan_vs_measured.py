"""`omni plan` against reality: the planner's per-process peak vs the measured peak of real steps.

Usage: python bench/plan_vs_measured.py [--rows NAME ...] [--tokens 256] [--steps 2] [--threads 2]
Every row is a stage of stages/tiny/ (random init, one process, the named engine) with its LLM
widened to Qwen2-7B's attention width (hidden 3584, 28 heads, 4 KV heads) at reduced depth
(1 layer) and a reduced MLP and vocabulary (`WIDE`), so that the fully trained rows stay under
~4 GiB on a shared CPU; the towers keep the tiny preset's size (their activations are a rounding
error next to the LLM's here). Each row runs in a fresh subprocess: the stage's objective, engine
and model as the trainer builds them, then `--steps` real steps (forward, backward, optimizer) on
samples of `--tokens` words and one image each (the image projector needs an image to train).

Both sides count the same thing: the memory a training process holds for the model and the step,
above what it held before building it. Measured: the peak resident memory (VmHWM) over the
steps — reset (/proc/self/clear_refs) after the engine is set up, so the build's transient fp32
copy of frozen parts is not counted, as on a GPU where the peak is the step's — minus the resident
memory after imports, tokenizer and samples, before the model is built. Planned: `plan_stage`'s
total for 1 process with the row's engine and the samples' real length.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
# Qwen2-7B's attention at 1 layer; MLP and vocabulary cut so that full training fits ~4 GiB on CPU
WIDE = ["llm.hf_config.hidden_size=3584", "llm.hf_config.num_attention_heads=28",
        "llm.hf_config.num_key_value_heads=4", "llm.hf_config.num_hidden_layers=1",
        "llm.hf_config.intermediate_size=4736", "llm.hf_config.vocab_size=8192"]
# name: (stage, stage overrides); every row is one process, micro-batch 2, unpacked
ROWS = {
    "sft ddp fp32": ("2_sft.yaml", ["engine=ddp", "precision=fp32"]),
    "projector ddp bf16": ("1a_image_projector.yaml", ["engine=ddp", "precision=bf16"]),
    "sft fsdp2 fp32": ("2_sft.yaml", ["engine=fsdp2", "precision=fp32"]),
    "sft fsdp2 bf16": ("2_sft.yaml", ["engine=fsdp2", "precision=bf16"]),
}


def _status(key: str) -> int:
    """A line of /proc/self/status in bytes (VmRSS: now; VmHWM: the peak since the last reset)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def stage_config(stage: str, overrides: list[str]):
    """The row's stage: one process, micro-batch 2, unpacked, no checkpointing, the LLM widened."""
    from omni.train.config import load_stage

    cfg = load_stage(ROOT / "stages/tiny" / stage,
                     ["init_from=null", "data.manifest=unused.yaml", "batch.micro_batch=2", "batch.grad_accum=1",
                      "batch.tokens_per_pack=0", "activation_checkpointing=false", *overrides])
    cfg.model_overrides = [*cfg.model_overrides, *WIDE]
    return cfg


def measure(stage: str, overrides: list[str], tokens: int, steps: int, threads: int) -> dict:
    """Run in a fresh process: `steps` trainer steps of the row; peak resident memory above the set-up."""
    import numpy as np
    import torch
    from PIL import Image

    from omni.align.objectives import OBJECTIVES
    from omni.distributed import World
    from omni.model.processor import OmniProcessor
    from omni.tiny_world import vocabulary
    from omni.model.omni_model import PRECISION_DTYPE
    from omni.train.engines import build_engine
    from omni.train.optim import set_trainable
    from omni.train.trainer import init_model

    torch.set_num_threads(threads)
    cfg = stage_config(stage, overrides)
    world = World.from_env(need_group=cfg.engine != "ddp")
    torch.manual_seed(cfg.seed)
    words = [w for w in vocabulary() if w.isalpha()]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=tokens)) for _ in range(2 * steps)]
    objective = OBJECTIVES[cfg.method](cfg)
    engine = build_engine(cfg, world)
    before = _status("VmRSS")
    model, tokenizer = init_model(cfg)
    model.use_attention(PRECISION_DTYPE[cfg.precision], world.device)
    proc = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    module = objective.prepare(model, tokenizer, proc, Path(tempfile.gettempdir()), None, [], world)
    set_trainable(module, objective.trainable(list(cfg.trainable)))
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    engine.setup(module)
    engine.train()
    side = model.encoders["image"].image_size
    examples = [proc([{"role": "user", "content": "<image> " + t[: len(t) // 4]},
                      {"role": "assistant", "content": t[len(t) // 4:]}],
                     {"image": [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))]})
                for t in texts]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the steps' peak from here
    losses = []
    for step in range(steps):
        batch, _ = objective.collate(examples[2 * step: 2 * step + 2])
        with engine.micro_batch(last=True):
            with engine.autocast():
                loss, _ = objective.loss(engine.module, batch, float(objective.units(batch)))
            engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    length = max(len(e.input_ids) for e in examples)
    world.close()
    return {"peak_gib": (_status("VmHWM") - before) / GIB, "seq_len": length, "losses": losses}


def planned(stage: str, overrides: list[str], seq_len: int) -> tuple[float, str]:
    from omni.plan import plan_stage
    from omni.train.engines import stage_layout

    cfg = stage_config(stage, overrides)
    plan = plan_stage(cfg, 1, 80, stage_layout(cfg), seq_len)
    return plan.total, plan.table()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--tokens", type=int, default=256, help="words per sample (the tiny tokenizer: a token each)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tables", action="store_true", help="also print each row's plan table")
    args = ap.parse_args()
    print(f"1 process, micro-batch 2 x ~{args.tokens} tokens, {args.steps} steps; LLM: {' '.join(WIDE)}")
    print(f"{'row':<22}{'seq':>6}{'planned GiB':>13}{'measured GiB':>14}{'planned/measured':>18}")
    for name in args.rows:
        stage, overrides = ROWS[name]
        call = f"measure({stage!r}, {overrides!r}, {args.tokens}, {args.steps}, {args.threads})"
        code = f"import json, bench.plan_vs_measured as m; print(json.dumps(m.{call}))"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        total, table = planned(stage, overrides, got["seq_len"])
        print(f"{name:<22}{got['seq_len']:>6}{total:>13.2f}{got['peak_gib']:>14.2f}{total / got['peak_gib']:>17.2f}x",
              flush=True)
        if args.tables:
            print(table)


if __name__ == "__main__":
    main()

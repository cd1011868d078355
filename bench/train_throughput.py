"""Training throughput: the padding-free packed pipeline vs the per-sample padded collate.

Usage: python bench/train_throughput.py [--steps 6] [--micro-batch 16] [--rounds 2] [--threads 1]
                                        [--override KEY=VALUE ...]
Trains stages/tiny/2_sft.yaml (random init, everything trainable, one ddp process) on the same
examples twice per mix, from the same initial weights: with the SFT objective's padded collate
(`batch.tokens_per_pack: 0`) and with its packed one (`omni.data.packing.collate_packed`, one row per
micro-batch). A step is what the trainer runs: collate, forward and backward under the engine,
optimizer step. Examples are decoded and tokenised once beforehand, so media decoding (the same
for both) is not in the time. Reports LLM tokens/s (the samples' own tokens) over the steps after
the first (warm-up), the fill (real tokens / tokens computed) and the packed / padded ratio; with
`--rounds` the two alternate and the median is taken, to even out a shared machine. Mixes: (a) the
tiny synthetic corpus (7 tasks, media included); (b) text chats whose token counts are log-normal
(median ~90) with the long tail clipped at the tiny stage's context (1024 tokens).
`--override` passes stage keys, e.g. `model_overrides=[llm.hf_config.hidden_size=512]`;
`--threads`: torch's intra-op threads (1 is steadier on a machine shared with other jobs).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omni.align.objectives import OBJECTIVES
from omni.data.loader import SkipCounter, decode_sample, split_stream
from omni.data.manifest import load_manifest
from omni.data.synth import SynthConfig, write_corpus
from omni.distributed import World
from omni.model.processor import Example, OmniProcessor
from omni.tiny_world import vocabulary
from omni.train.config import load_stage
from omni.train.engines import build_engine
from omni.train.optim import set_trainable
from omni.train.trainer import init_model

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages/tiny/2_sft.yaml"
CONTEXT = 1024      # the tiny preset's max_position_embeddings: the stage's longest sample
TEMPLATE = 32       # room for the chat template around one user + one assistant turn


def synthetic_examples(proc: OmniProcessor, per_task: int) -> list[Example]:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(write_corpus(SynthConfig(out_dir=tmp, train_per_task=per_task, val_per_task=1),
                                              progress=False))
        out = []
        for entry in manifest.select("train"):
            for raw in split_stream(entry, SkipCounter()):
                _, messages, media = decode_sample(raw)
                out.append(proc(messages, media))
    order = np.random.default_rng(0).permutation(len(out))  # the training mixture interleaves tasks
    return [out[i] for i in order]


def skewed_examples(proc: OmniProcessor, n: int) -> list[Example]:
    """`n` text chats whose word counts are log-normal, the long tail clipped to the context."""
    rng = np.random.default_rng(0)
    words = [w for w in vocabulary() if w.isalpha()]
    out = []
    for total in np.clip(rng.lognormal(4.5, 1.0, n), 16, CONTEXT - TEMPLATE).astype(int):
        text = rng.choice(words, size=int(total))
        user = max(1, int(total) // 3)
        out.append(proc([{"role": "user", "content": " ".join(text[:user])},
                         {"role": "assistant", "content": " ".join(text[user:])}], {}))
    return out


def trainer_pieces(overrides: list[str]):
    """The trainer's pieces for one ddp process on stages/tiny/2_sft.yaml (random init, everything
    trainable) with stage `overrides`: (objective, engine, world, the model's processor)."""
    cfg = load_stage(STAGE, ["init_from=null", "data.manifest=unused.yaml", *overrides])
    world = World.from_env()
    torch.manual_seed(cfg.seed)
    model, tokenizer = init_model(cfg)
    model.use_attention(torch.float32 if cfg.precision == "fp32" else torch.bfloat16, world.device)
    objective = OBJECTIVES[cfg.method](cfg)
    proc = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    module = objective.prepare(model, tokenizer, proc, Path(tempfile.gettempdir()), None, [], world)
    set_trainable(module, objective.trainable(list(cfg.trainable)))
    engine = build_engine(cfg, world)
    engine.setup(module)
    engine.train()
    return objective, engine, world, proc


def train_step(objective, engine, world, made: list[Example]) -> float:
    """One trainer step on the micro-batch `made`: collate, forward and backward, optimizer step;
    returns the micro-batch's fill."""
    batch, fill = objective.collate(made)
    batch = batch.to(world.device)
    with engine.micro_batch(last=True):
        with engine.autocast():
            loss, _ = objective.loss(engine.module, batch, float(objective.units(batch)))
        engine.backward(loss)
    engine.step()
    return fill


def train(examples: list[Example], steps: int, micro: int, packed: bool, extra: list[str]) -> dict:
    """`steps` trainer steps on `examples` in order; tokens/s after the first step, mean fill, tokens."""
    pack = [f"batch.tokens_per_pack={micro * CONTEXT}"] if packed else []
    objective, engine, world, _ = trainer_pieces([f"batch.micro_batch={micro}", *pack, *extra])
    tokens, fills, start = 0, [], 0.0
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        made = examples[step * micro:(step + 1) * micro]
        fill = train_step(objective, engine, world, made)
        if step >= 1:
            tokens += sum(objective.lengths(made))
            fills.append(fill)
    seconds = time.perf_counter() - start
    world.close()
    return {"tokens_per_s": tokens / seconds, "fill": statistics.mean(fills), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_stage(STAGE, ["init_from=null", "data.manifest=unused.yaml", *args.override])
    model, tokenizer = init_model(cfg)
    proc = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    need = args.steps * args.micro_batch
    mixes = {"synthetic corpus": synthetic_examples(proc, need // 7 + 1)[:need],
             "skewed (log-normal)": skewed_examples(proc, need)}
    lengths = [len(e.input_ids) for e in mixes["skewed (log-normal)"]]
    print(f"tiny 2_sft {' '.join(args.override)}, micro-batch {args.micro_batch}, {args.steps - 1} measured steps, "
          f"{args.rounds} rounds, {args.threads} thread(s); skewed tokens: median {int(np.median(lengths))}, "
          f"p95 {int(np.percentile(lengths, 95))}, max {max(lengths)}")
    print(f"{'mix':<22}{'padded tok/s':>13}{'packed tok/s':>13}{'ratio':>8}{'padded fill':>12}{'packed fill':>12}")
    for name, examples in mixes.items():
        runs = {"padded": [], "packed": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(train(examples, args.steps, args.micro_batch, kind == "packed", args.override))
        pad, pack = (statistics.median(r["tokens_per_s"] for r in runs[k]) for k in ("padded", "packed"))
        fill = {k: statistics.mean(r["fill"] for r in runs[k]) for k in runs}
        print(f"{name:<22}{pad:>13.0f}{pack:>13.0f}{pack / pad:>7.2f}x{fill['padded']:>12.3f}{fill['packed']:>12.3f}")


if __name__ == "__main__":
    main()

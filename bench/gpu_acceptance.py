"""GPU acceptance: the 7B preset's widths on one GPU, through omni's own code, in one table.

Usage: python bench/gpu_acceptance.py [--cpu] [--layers 2] [--steps 3] [--pack 4096] [--samples 12]

On a GPU: the `7b` preset at full width with `--layers` LLM layers (Qwen2-7B's config.json from the
local Hugging Face cache when it is there, else its published copy bench/qwen2_7b_config.json) and
the real-width towers (SigLIP so400m, Whisper-large-v3 encoder), all random-init, trained as
stages/7b/2_sft.yaml trains (everything trainable, bf16 autocast, activation checkpointing) on packed
micro-batches of the synthetic corpus' samples. Attention: FlashAttention-2 when flash-attn is
installed, else SDPA per packed sample (omni's `attn_implementation: auto`). It prints one table:
- packed vs alone: the logits of samples packed into one row (omni/data/packing.py) against the
  same samples run one by one, largest difference relative to the largest logit;
- one FSDP2 step and one DeepSpeed ZeRO-3 step (one process; after `--steps - 1` warm-up steps):
  loss, LLM tokens/s, model TFLOP/s and MFU (omni/train/flops.py), `torch.cuda.max_memory_allocated`
  next to `omni plan`'s total for the same stage on one GPU of this one's memory;
- one QLoRA step (ddp; rank-16 adapters over the LLM's 4-bit NF4 base, bitsandbytes' CUDA kernels),
  the same columns.
With `--cpu`, or without CUDA: the same steps on the `tiny` preset (stages/tiny/2_sft.yaml, gloo),
so CI keeps the script working (tests/integration/test_gpu_acceptance_cpu.py); no memory columns.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from omni.align.objectives import OBJECTIVES
from omni.data.packing import collate_packed
from omni.data.records import record_from_raw
from omni.data.synth import SynthConfig, iter_samples
from omni.distributed import World
from omni.model.omni_model import PRECISION_DTYPE
from omni.model.processor import OmniProcessor, collate
from omni.modalities import MODALITIES
from omni.plan import GIB, plan_stage
from omni.tiny_world import TASKS
from omni.tokenizer import TINY_TOKENIZER
from omni.train.config import load_stage
from omni.train.engines import build_engine, stage_layout
from omni.train.flops import FlopCounter, peak_tflops
from omni.train.lora import apply_lora, trainable_globs
from omni.train.qlora import quantize_base
from omni.train.checkpoint import seed_everything
from omni.train.optim import set_trainable
from omni.train.trainer import init_model

ROOT = Path(__file__).resolve().parents[1]
QWEN2_7B = "Qwen/Qwen2-7B"
ENGINES = {"fsdp2": ["engine=fsdp2"], "deepspeed zero3": ["engine=deepspeed", "zero_stage=3"]}
# QLoRA as docs/lora.md shows it: rank-16 adapters on the LLM over its 4-bit NF4 base, the projectors trained fully
QLORA = ["engine=ddp", "lora.rank=16", "lora.alpha=16", "lora.qlora=true", "trainable=[projectors.*]",
         "lora.targets=[llm.model.layers.*.self_attn.*, llm.model.layers.*.mlp.*]"]


def llm_architecture(layers: int) -> tuple[dict, str]:
    """Qwen2-7B's config with `layers` layers, and where it came from (no download)."""
    from transformers import AutoConfig

    try:
        config, source = AutoConfig.from_pretrained(QWEN2_7B, local_files_only=True).to_dict(), f"{QWEN2_7B} (cache)"
    except OSError:
        config, source = json.loads((ROOT / "bench/qwen2_7b_config.json").read_text()), "bench/qwen2_7b_config.json"
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "rms_norm_eps",
            "num_key_value_heads", "max_position_embeddings", "rope_theta", "rope_parameters", "tie_word_embeddings")
    return {**{k: config[k] for k in keep if k in config}, "num_hidden_layers": layers}, source


def stage(gpu: bool, layers: int, pack: int, samples: int, engine: list[str]):
    """stages/<size>/2_sft.yaml as the acceptance run trains it: random init, packed micro-batches."""
    common = ["init_from=null", f"batch.micro_batch={samples}", f"batch.tokens_per_pack={pack}", "batch.grad_accum=1",
              "steps=100", *engine]
    if not gpu:
        return load_stage(ROOT / "stages/tiny/2_sft.yaml", common), "tiny preset (reduced width)"
    hf_config, source = llm_architecture(layers)
    cfg = load_stage(ROOT / "stages/7b/2_sft.yaml", common)
    arch = yaml.safe_dump(hf_config, default_flow_style=True, width=1 << 20).strip()  # YAML, as overrides are read
    cfg.model_overrides = ["llm.pretrained=null", f"llm.hf_config={arch}", f"tokenizer={TINY_TOKENIZER}",
                           "image.pretrained=null", "audio.checkpoint=null"]
    return cfg, f"7b preset, {layers} LLM layers ({source}), random init"


def examples(processor, objective, n: int, seed: int = 0) -> list:
    """`n` synthetic samples (every task in turn: image, video, audio, image+audio, text) made as
    the stage's objective makes them."""
    synth = SynthConfig(out_dir="unused", seed=seed)
    streams = [iter_samples(synth, task, "train") for task in TASKS]
    out = []
    while len(out) < n:
        for s in streams:
            if len(out) < n:
                out.append(objective.make(record_from_raw(next(s).to_wds())))
    return out


@torch.no_grad()
def packed_vs_alone(model, made: list, pad_id: int, device, autocast) -> float:
    """Largest |logit difference| between samples packed into one row (`collate_packed`) and the
    same samples alone, relative to the largest |logit|."""
    packed, _ = collate_packed(made)
    packed = packed.to(device)
    with autocast():
        row = model(packed.input_ids, packed.attention_mask, media=packed.media,
                    position_ids=packed.position_ids).logits[0].float()
    worst, top, at = 0.0, 0.0, 0
    for e in made:
        alone = collate([e], pad_id).to(device)
        with autocast():
            logits = model(alone.input_ids, alone.attention_mask, media=alone.media).logits[0].float()
        n = len(e.input_ids)
        worst = max(worst, (row[at: at + n] - logits).abs().max().item())
        top = max(top, logits.abs().max().item())
        at += n
    return worst / max(top, 1e-12)


def train_steps(cfg, world: World, steps: int, device) -> dict:
    """`steps` optimizer steps of the stage's engine (the trainer's step, one micro-batch each);
    the last one is measured."""
    objective = OBJECTIVES[cfg.method](cfg)
    engine = build_engine(cfg, world)
    if device.type == "cuda":  # this run's own peak, above whatever an earlier run left allocated
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    seed_everything(cfg.seed)  # every engine starts from the same weights: their first losses agree
    with torch.device(device):
        model, tokenizer = init_model(cfg)
    if cfg.lora.qlora:  # as the trainer does: the 4-bit base, then the adapters
        quantize_base(model, PRECISION_DTYPE[cfg.precision])
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    model.use_attention(PRECISION_DTYPE[cfg.precision], device)  # as the trainer does: FA2 for bf16 on a GPU
    processor = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    module = objective.prepare(model, tokenizer, processor, Path("unused"), None, [], world)
    set_trainable(module, objective.trainable(trainable_globs(cfg.lora, cfg.trainable)))
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    flops = FlopCounter(model)
    engine.setup(module)
    engine.train()
    made = examples(processor, objective, cfg.batch.micro_batch)
    lengths = objective.lengths(made)
    batch, _ = objective.collate(made)
    batch = batch.to(device)
    present = {m for m in MODALITIES if getattr(batch.media, m) is not None}
    blank = tuple(sorted(m for m in engine.modalities_to_run(present) if m not in present))
    units = objective.units(batch)
    losses = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with engine.micro_batch(last=True):
            with engine.autocast():
                loss, _ = objective.loss(engine.module, batch, units, blank)
            engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        losses.append(loss.item())
    peak = peak_tflops(device, cfg.precision, cfg.log.peak_tflops)
    tflops = flops(lengths, batch.media) / seconds / 1e12
    result = {"loss": losses[0], "last_loss": losses[-1], "tokens_per_s": sum(lengths) / seconds, "tflops": tflops,
              "mfu": tflops / peak if peak else None, "tokens": sum(lengths), "seconds": seconds, "steps": steps,
              "peak_gib": (torch.cuda.max_memory_allocated(device) - before) / GIB if device.type == "cuda" else None}
    del engine, module, model, batch, loss, flops  # the counter holds the model too
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parity(cfg, device) -> tuple[float, str]:
    """The packed-vs-alone check on the stage's model (eval mode, the stage's precision)."""
    objective = OBJECTIVES[cfg.method](cfg)
    with torch.device(device):
        model, tokenizer = init_model(cfg)
    model.eval()
    backend = model.use_attention(PRECISION_DTYPE[cfg.precision], device)
    processor = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    objective.prepare(model, tokenizer, processor, Path("unused"), None, [], World(device=device))
    made = examples(processor, objective, 5, seed=1)
    bf16 = cfg.precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else torch.no_grad
    worst = packed_vs_alone(model, made, tokenizer.pad_token_id, device, autocast)
    del model
    gc.collect()
    return worst, backend


def run(cpu: bool = False, layers: int = 2, steps: int = 3, pack: int = 4096, samples: int = 12) -> list[dict]:
    """Every row of the table (also what the CPU test checks)."""
    gpu = torch.cuda.is_available() and not cpu
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if not gpu:
        pack, samples = min(pack, 512), min(samples, 8)
    # one process: FSDP2 and ZeRO-3 shard over a mesh of 1 (NCCL on the GPU, gloo on the CPU)
    world = World(device=device, owns_group=True)
    dist.init_process_group(world.backend, store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    try:
        cfg, what = stage(gpu, layers, pack, samples, ENGINES["fsdp2"])
        worst, backend = parity(cfg, device)
        tolerance = 2e-2 if cfg.precision == "bf16" else 1e-4
        rows.append({"check": "packed vs alone logits", "what": f"{backend}; {what}", "value": worst,
                     "ok": worst <= tolerance, "tolerance": tolerance, "measure": "max |dlogit| / max |logit|"})
        gib = torch.cuda.get_device_properties(device).total_memory / GIB if gpu else 80.0
        for name, engine in ENGINES.items():
            cfg, _ = stage(gpu, layers, pack, samples, engine)
            plan = plan_stage(cfg, 1, gib)
            result = train_steps(cfg, world, steps, device)
            rows.append({"check": f"{name} step", "engine": stage_layout(cfg), "plan_gib": plan.total,
                         "ok": math.isfinite(result["loss"]), **result})
        first = [r["loss"] for r in rows[1:]]
        gap = max(first) - min(first)
        tolerance = 5e-2 if cfg.precision == "bf16" else 1e-4
        rows.append({"check": "fsdp2 vs zero3 loss", "value": gap, "ok": gap <= tolerance, "tolerance": tolerance,
                     "what": "first step, same weights and batch", "measure": "|dloss|"})
        cfg, _ = stage(gpu, layers, pack, samples, QLORA)
        plan = plan_stage(cfg, 1, gib)
        result = train_steps(cfg, world, steps, device)
        rows.append({"check": "qlora step", "engine": "ddp, 4-bit base", "plan_gib": plan.total,
                     "ok": math.isfinite(result["loss"]) and math.isfinite(result["last_loss"]), **result})
    finally:
        world.close()
    return rows


def table(rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{'check':<24}{'result':>14}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>10}  ok"]
    for r in rows:
        if "value" in r:
            lines.append(f"{r['check']:<24}{r['value']:>14.2e}{'':>11}{'':>9}{'':>7}{'':>10}{'':>10}  "
                         f"{'yes' if r['ok'] else 'NO'} ({r['measure']} <= {r['tolerance']:g}; {r['what']})")
        else:
            lines.append(f"{r['check']:<24}{'loss ' + format(r['loss'], '.3f'):>14}{r['tokens_per_s']:>11.0f}"
                         f"{r['tflops']:>9.3g}{fmt(r['mfu'], '.3f'):>7}{fmt(r['peak_gib'], '.1f'):>10}"
                         f"{r['plan_gib']:>10.3g}  {'yes' if r['ok'] else 'NO'} ({r['engine']}, step {r['steps']} "
                         f"measured, loss then {r['last_loss']:.3f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="reduced width on the CPU (also the default without CUDA)")
    p.add_argument("--layers", type=int, default=2, help="LLM layers at the 7B width")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per engine; the last is measured")
    p.add_argument("--pack", type=int, default=4096, help="batch.tokens_per_pack: the packed row length omni plan assumes")
    p.add_argument("--samples", type=int, default=12, help="samples in the micro-batch (12 synthetic ones fill "
                                                           "~3.5k tokens of the 7B preset: one packed row)")
    args = p.parse_args()
    print(table(run(args.cpu, args.layers, args.steps, args.pack, args.samples)))


if __name__ == "__main__":
    main()

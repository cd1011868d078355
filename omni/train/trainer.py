"""The one training loop every stage uses: config in, `final/` model folder out.

One process, or one per GPU/CPU slot under torchrun (DDP). Per step: `grad_accum` micro-batches, gradient clipping,
AdamW with per-group learning rates, warmup + cosine. Console progress bar plus a JSONL metrics
file; resumable checkpoints every `checkpoint.interval` steps; the final model is written
atomically to `<out>/final/`, the folder the next stage's `init_from` points at.
"""
from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from omni.config import to_dict
from omni.data.loader import ExampleStream, SkipCounter, training_stream
from omni.data.manifest import load_manifest
from omni.model import OmniModel
from omni.presets import build_preset
from omni.packing import collate_packed
from omni.processor import OmniProcessor, collate
from omni.train.checkpoint import latest_resumable, load_resumable, save_model_dir, save_resumable
from omni.train.config import StageConfig
from omni.train.distributed import World
from omni.train.optim import build_optimizer, build_scheduler, set_trainable

log = logging.getLogger(__name__)
FINAL = "final"
METRICS = "metrics.jsonl"


def init_model(cfg: StageConfig):
    """The stage's starting point: a previous stage's output, or the preset (pretrained parts)."""
    if cfg.init_from:
        return OmniModel.from_pretrained(cfg.init_from, cfg.model_overrides)
    return OmniModel.from_config(build_preset(cfg.preset, cfg.model_overrides))


def train_stage(cfg: StageConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Run one stage into `out_dir`; resumes from its newest checkpoint if there is one.

    Under torchrun every rank reads the same seeded sample stream and keeps every world-th sample,
    and the loss is normalised by the label tokens of the whole step (all micro-batches, all
    ranks), so N processes x micro-batch b train exactly like 1 process x micro-batch N*b."""
    world = World.from_env()
    try:
        return _train(cfg, Path(out_dir), progress and world.main, world)
    finally:
        world.close()


def _train(cfg: StageConfig, out_dir: Path, progress: bool, world: World) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if world.main:
        (out_dir / "stage.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model, tokenizer = init_model(cfg)
    trainable = set_trainable(model, cfg.trainable)
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    model.to(world.device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    processor = OmniProcessor(tokenizer, model)

    manifest = load_manifest(cfg.data.manifest)
    entries = manifest.select(cfg.data.split, list(cfg.data.datasets) or None)
    weights = [cfg.data.datasets.get(e.name, e.weight) for e in entries]
    counter = SkipCounter(max_fraction=cfg.data.max_bad_fraction)
    raw = training_stream(entries, weights, cfg.seed, cfg.data.shuffle_buffer, counter,
                          rank=world.rank, world_size=world.size)
    stream = ExampleStream(raw, processor, counter)

    step = 0
    ckpt_root = out_dir / "checkpoints"
    resume = latest_resumable(ckpt_root)
    if resume is not None:
        step, consumed = load_resumable(resume, model, optimizer, scheduler)
        if len(consumed) != world.size:
            raise RuntimeError(f"{resume} was written by {len(consumed)} process(es); resume it with as many "
                               f"(this run has {world.size})")
        stream.skip(consumed[world.rank])
        log.info("resumed %s from %s at step %d", cfg.name, resume, step)

    log.info("stage %s: %d/%d parameters trainable (%s ...), %d steps of %d process(es) x %d x %d samples",
             cfg.name, n_train, n_all, ", ".join(trainable[:3]), cfg.steps, world.size,
             cfg.batch.micro_batch, cfg.batch.grad_accum)
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    pad_id = tokenizer.pad_token_id
    ddp_model = world.wrap(model)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, disable=not progress, dynamic_ncols=True)
    t0, window_loss, window_fill, window_n = time.time(), 0.0, 0.0, 0
    metrics = open(out_dir / METRICS, "a") if world.main else None
    try:
        while step < cfg.steps:
            batches, fill = [], 0.0
            for _ in range(cfg.batch.grad_accum):
                examples = stream.take(cfg.batch.micro_batch)
                if cfg.batch.tokens_per_pack:
                    batch, f = collate_packed(examples, cfg.batch.tokens_per_pack, pad_id)
                else:
                    batch = collate(examples, pad_id)
                    f = float(batch.attention_mask.float().mean())
                batches.append(batch.to(world.device))
                fill += f / cfg.batch.grad_accum
            # every label token of the step weighs the same, whichever micro-batch or rank holds it
            tokens = world.sum(sum(int((b.labels[:, 1:] != -100).sum()) for b in batches))
            per_rank = max(tokens, 1) / world.size
            total = 0.0
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                sync = nullcontext() if last or world.size == 1 else ddp_model.no_sync()
                with sync:
                    with autocast:
                        out = ddp_model(batch.input_ids, batch.attention_mask, batch.labels, batch.media,
                                        position_ids=batch.position_ids, num_items_in_batch=per_rank)
                    out.loss.backward()
                total += out.loss.item()
            total = world.sum(total) / world.size
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss, window_fill, window_n = window_loss + total, window_fill + fill, window_n + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if step % cfg.log.interval == 0 or step == cfg.steps:
                samples = world.gather(stream.consumed)
                if metrics is not None:
                    row = {"stage": cfg.name, "step": step, "loss": window_loss / window_n,
                           "fill": round(window_fill / window_n, 4),  # real tokens / batch tokens
                           "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "samples": sum(samples), "skipped": counter.skipped,
                           "elapsed_s": round(time.time() - t0, 2)}
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if not progress:  # the bar shows the loss; without it, a console line
                        log.info("%s step %d/%d loss %.4f lr %.2e", cfg.name, step, cfg.steps, row["loss"], row["lr"])
                window_loss, window_fill, window_n = 0.0, 0.0, 0
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.steps:
                consumed = world.gather(stream.consumed)
                if world.main:
                    save_resumable(model, tokenizer, optimizer, scheduler, step, consumed,
                                   ckpt_root, cfg.checkpoint.keep)
                world.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if counter.skipped:
        log.warning("stage %s skipped %d bad samples of %d", cfg.name, counter.skipped,
                    counter.skipped + counter.good)
    if world.main:
        save_model_dir(model, tokenizer, out_dir / FINAL)
        log.info("stage %s done in %.1f s -> %s", cfg.name, time.time() - t0, out_dir / FINAL)
    world.barrier()
    return out_dir / FINAL

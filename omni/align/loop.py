"""The one align training loop: SFT, DPO and the reward model differ only by their `Method`.

It is built from the omni trainer's own pieces (omni/train): parameter globs (`set_trainable`),
AdamW groups and warmup + cosine (`build_optimizer`, `build_scheduler`), atomic checkpoint folders
(`atomic_dir`, `latest_resumable`, the trainer-state file name) and the torchrun process group
(`World`); under torchrun the module is wrapped in torch's DistributedDataParallel (align runs
are ddp only: FSDP2/DeepSpeed engines are the stage trainer's). What it adds is the method hook:
a method turns records into micro-batches and a micro-batch into a loss, and evaluates on
held-out records before, during and after training.

Per step: `grad_accum` micro-batches of `micro_batch` records on each of `world` processes; the
loss of every micro-batch is a *sum* over its units (label tokens for SFT, pairs for DPO/RM)
divided by the units of the whole step over all processes (times the process count, which DDP's
gradient averaging divides out), so any split of a step into micro-batches and processes gives
the same gradient. Outputs: `metrics.jsonl`, `eval.jsonl` (each evaluation), `eval.json` (the
first and last), `checkpoints/`, and the model in `final/`.
"""
from __future__ import annotations

import json
import logging
import random
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from omni.align.config import AlignConfig
from omni.align.data import RecordStream, read_records
from omni.config import to_dict
from omni.data.loader import SkipCounter
from omni.model import OmniModel
from omni.processor import OmniProcessor
from omni.train.checkpoint import STATE, atomic_dir, latest_resumable, seed_everything
from omni.train.distributed import World
from omni.train.optim import build_optimizer, build_scheduler, set_trainable

log = logging.getLogger(__name__)
FINAL = "final"


class Method(ABC):
    """What SFT / DPO / RM implement. `module` is the trained nn.Module (the omni model, or a
    wrapper around it); it must offer `save_pretrained(dir, tokenizer)`."""
    name = "method"

    def __init__(self, cfg: AlignConfig):
        self.cfg = cfg

    def prepare(self, model: OmniModel, tokenizer, processor: OmniProcessor, out_dir: Path,
                train: list, evals: list, device: torch.device) -> torch.nn.Module:
        self.tokenizer, self.processor, self.device = tokenizer, processor, device
        return model

    def trainable(self, globs: list[str]) -> list[str]:
        return globs

    @abstractmethod
    def make(self, index: int, record: dict):
        """One record -> what `collate` takes (raise on a bad record: it is skipped and counted)."""

    @abstractmethod
    def collate(self, made: list):
        """Made records -> one batch."""

    @abstractmethod
    def units(self, batch) -> int:
        """What the loss is normalised by (tokens or pairs) in this batch."""

    @abstractmethod
    def loss(self, module, batch, denom: float) -> tuple[torch.Tensor, dict]:
        """Summed loss of the batch / denom, and stats (floats) for the log."""

    @torch.no_grad()
    def evaluate(self, module, records: list) -> dict:
        return {}

    def load_weights(self, module, path: Path) -> None:
        from safetensors.torch import load_model

        load_model(module, str(path / "model.safetensors"))


def take_batch(method: Method, stream: RecordStream, k: int, counter: SkipCounter, world: World) -> list:
    """k good records for this rank (bad ones skipped and counted); every rank walks the same
    stream and keeps its share, so N processes see what one would."""
    made = []
    while len(made) < k:
        for j, (index, rec) in enumerate(stream.take((k - len(made)) * world.size)):
            if j % world.size != world.rank:
                continue
            try:
                made.append(method.make(index, rec))
                counter.ok()
            except Exception as e:  # noqa: BLE001 - counted, named, rate-limited like the omni loader
                counter.skip(str(rec.get("__where__", f"record {index}")), e)
    return made


def _save(path_root: Path, module, tokenizer, optimizer, scheduler, step: int, consumed: list[int], keep: int) -> Path:
    """A resumable checkpoint folder `step-XXXXXXXX` (atomic), the oldest beyond `keep` removed.
    `consumed`: each rank's stream position (they differ only when a rank skipped bad records)."""
    import shutil

    with atomic_dir(path_root / f"step-{step:08d}") as tmp:
        module.save_pretrained(tmp, tokenizer)
        torch.save({"step": step, "samples": consumed, "engine": "align-ddp",
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "numpy": np.random.get_state()}}, tmp / STATE)
    for old in sorted(path_root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return path_root / f"step-{step:08d}"


def _restore(path: Path, method: Method, module, optimizer, scheduler) -> tuple[int, list[int]]:
    method.load_weights(module, path)
    state = torch.load(path / STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"], state["samples"]


def load_split(cfg: AlignConfig) -> tuple[list, list]:
    train = read_records(cfg.data.train, cfg.data.split, list(cfg.data.datasets) or None)
    evals = read_records(cfg.data.eval, cfg.data.eval_split, list(cfg.data.datasets) or None) if cfg.data.eval else []
    if cfg.data.eval_limit:
        evals = evals[:cfg.data.eval_limit]
    return train, evals


def train_align(cfg: AlignConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Run one align stage into `out_dir`; resumes from its newest checkpoint if there is one."""
    from omni.align.methods import METHOD_CLASSES

    world = World.from_env()
    out_dir = Path(out_dir)
    try:
        return _train(cfg, out_dir, progress and world.main, world, METHOD_CLASSES[cfg.method](cfg))
    finally:
        world.close()


def _train(cfg: AlignConfig, out_dir: Path, progress: bool, world: World, method: Method) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if world.main:
        (out_dir / "align.json").write_text(json.dumps(to_dict(cfg), indent=2))
    seed_everything(cfg.seed)

    model, tokenizer = OmniModel.from_pretrained(cfg.init_from, cfg.model_overrides)
    model.to(world.device)
    train, evals = load_split(cfg)
    processor = OmniProcessor(tokenizer, model)
    module = method.prepare(model, tokenizer, processor, out_dir, train, evals, world.device)
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    module.to(world.device)
    chosen = set_trainable(module, method.trainable(list(cfg.trainable)))
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    stream = RecordStream(train, cfg.seed)
    counter = SkipCounter(max_fraction=cfg.data.max_bad_fraction)

    step = 0
    ckpt_root = out_dir / "checkpoints"
    resume = latest_resumable(ckpt_root)
    if resume is not None:
        step, consumed = _restore(resume, method, module, optimizer, scheduler)
        if len(consumed) != world.size:
            raise RuntimeError(f"{resume} was written by {len(consumed)} process(es); resume it with as many "
                               f"(this run has {world.size})")
        stream.skip(consumed[world.rank])
        log.info("resumed %s from %s at step %d", cfg.name, resume, step)
    log.info("align %s (%s): %d trainable tensors (%s ...), %d train / %d held-out records, %d steps",
             cfg.name, cfg.method, len(chosen), ", ".join(chosen[:3]), len(train), len(evals), cfg.steps)

    def evaluate(at: int) -> dict:
        module.eval()
        result = {"step": at, **method.evaluate(module, evals)} if evals else {"step": at}
        module.train()
        if world.main:
            with open(out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
        return result

    first = None
    if evals:  # the "before" numbers: measured now, or read back when resuming
        seen = (out_dir / "eval.jsonl").read_text().splitlines() if (out_dir / "eval.jsonl").is_file() else []
        first = json.loads(seen[0]) if step and seen else evaluate(step)
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    ddp = module
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
    module.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, disable=not progress, dynamic_ncols=True)
    metrics = open(out_dir / "metrics.jsonl", "a") if world.main else None  # noqa: SIM115 - closed in finally
    t0, window = time.time(), []
    try:
        while step < cfg.steps:
            batches = [method.collate(take_batch(method, stream, cfg.batch.micro_batch, counter, world))
                       .to(world.device) for _ in range(cfg.batch.grad_accum)]
            denom = max(world.sum(sum(method.units(b) for b in batches)), 1) / world.size
            total, stats = 0.0, {}
            for i, batch in enumerate(batches):
                sync = nullcontext() if i == len(batches) - 1 or world.size == 1 else ddp.no_sync()
                with sync:
                    with autocast:
                        loss, s = method.loss(ddp, batch, denom)
                    loss.backward()
                total += loss.item()
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v / len(batches)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.append({"loss": world.sum(total) / world.size, **stats})
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]['loss']:.3f}")
            if step % cfg.log.interval == 0 or step == cfg.steps:
                if metrics is not None:
                    row = {"stage": cfg.name, "step": step, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "records": stream.consumed, "skipped": counter.skipped,
                           "elapsed_s": round(time.time() - t0, 2)}
                    row.update({k: sum(w[k] for w in window) / len(window) for k in window[0]})
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                window = []
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps and evals:
                evaluate(step)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.steps:
                consumed = world.gather(stream.consumed)
                if world.main:
                    _save(ckpt_root, module, tokenizer, optimizer, scheduler, step, consumed, cfg.checkpoint.keep)
                world.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    last = evaluate(step) if evals else None
    if world.main:
        if evals:
            (out_dir / "eval.json").write_text(json.dumps({"before": first, "after": last}, indent=2))
        with atomic_dir(out_dir / FINAL) as tmp:
            module.save_pretrained(tmp, tokenizer)
        log.info("align %s done in %.1f s -> %s", cfg.name, time.time() - t0, out_dir / FINAL)
    world.barrier()
    return out_dir / FINAL

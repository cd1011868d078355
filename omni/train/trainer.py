"""The one training loop every stage and align run uses: config in, `final/` model folder out.

One process, or one per GPU/CPU slot under torchrun, on the stage's engine (omni/train/engines.py:
ddp, fsdp2, deepspeed ZeRO-2/3), with the stage's objective (`method:` sft, dpo or rm;
omni/align/objectives/). Per step: `grad_accum` micro-batches, gradient clipping, AdamW with
per-group learning rates, warmup + cosine. Console progress bar plus a JSONL metrics file (with
`log.profile`: tokens/s, model TFLOP/s and MFU); held-out records (`data.eval`) scored by the objective
before, every `eval_interval` steps and after (`eval.jsonl`, `eval.json`); with `log.samples` every
step's samples (`samples.jsonl`); resumable checkpoints every `checkpoint.interval` steps (ddp and
fsdp2 resume them on another number of processes too); the final model is written atomically to
`<out>/final/`, the folder the next stage's `init_from` points at.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omni.align.objectives import OBJECTIVES
from omni.align.objectives.base import chunks, merge_shares
from omni.config import ConfigError, to_dict
from omni.data.loader import SkipCounter
from omni.data.prefetch import Feeder
from omni.data.training import held_out, training_records, training_stream
from omni.distributed import World
from omni.modalities import MODALITIES
from omni.model.architecture import check_same_model
from omni.model.load import load_model, save_model_dir
from omni.model.omni_model import PRECISION_DTYPE, OmniModel
from omni.model.processor import OmniProcessor
from omni.presets import build_preset
from omni.train.checkpoint import (
    latest_resumable,
    load_resumable,
    read_resumable,
    save_resumable,
    seed_everything,
)
from omni.train.config import StageConfig
from omni.train.engines import build_engine, write_engine_config
from omni.train.flops import FlopCounter, peak_tflops
from omni.train.lora import apply_lora, check_full_training, save_lora_final, trainable_globs
from omni.train.qlora import dequantized_state, quantize_base
from omni.train.optim import set_trainable
from omni.train.trackers import Trackers

log = logging.getLogger(__name__)
FINAL = "final"
METRICS = "metrics.jsonl"
EVALS = "eval.jsonl"
SAMPLES = "samples.jsonl"


def init_model(cfg: StageConfig, skeleton: bool = False):
    """The stage's starting point: a previous stage's output, or the preset (pretrained parts).
    `skeleton`: the architecture on the meta device, no weights read or initialised, for ranks
    whose engine fills them from rank 0 (`Engine.weights_from_rank0`)."""
    if skeleton:
        with torch.device("meta"):
            if cfg.init_from:
                return load_model(cfg.init_from, cfg.model_overrides, weights=False)
            return OmniModel.from_config(build_preset(cfg.preset, cfg.model_overrides), pretrained=False)
    if cfg.init_from:
        return load_model(cfg.init_from, cfg.model_overrides)
    return OmniModel.from_config(build_preset(cfg.preset, cfg.model_overrides))


def train_stage(cfg: StageConfig, out_dir: str | Path, progress: bool = True, resume_with_changes: bool = False) -> Path:
    """Run one stage into `out_dir`; resumes from its newest checkpoint if there is one. A resume
    whose config differs from the checkpoint's in anything that shapes the run (data, batch,
    optimiser, seed, steps, ...) is refused unless `resume_with_changes` (then the changes are logged).

    Under torchrun (with `data.partition: sample`, the default) every rank reads the same seeded
    sample stream and keeps every world-th sample, and the loss is normalised by the units (label
    tokens, pairs) of the whole step (all micro-batches, all ranks), so N processes x micro-batch b
    train exactly like 1 process x micro-batch N*b. So a checkpoint of ddp or fsdp2 resumes on another
    number of processes too, given the same global batch (processes x micro_batch x grad_accum):
    the weights and optimizer reshard and the data continues where all ranks together stopped."""
    world = World.from_env(need_group=cfg.engine != "ddp")
    try:
        return _train(cfg, Path(out_dir), progress and world.main, world, resume_with_changes)
    finally:
        world.close()


def _train(cfg: StageConfig, out_dir: Path, progress: bool, world: World, resume_with_changes: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if world.main:
        (out_dir / "stage.json").write_text(json.dumps(to_dict(cfg), indent=2))
    seed_everything(cfg.seed)

    objective = OBJECTIVES[cfg.method](cfg)
    engine = build_engine(cfg, world)
    # a checkpoint this run cannot continue is refused before any weights are built
    resume = latest_resumable(out_dir / "checkpoints")
    saved = read_resumable(resume, engine) if resume is not None else None
    if saved is not None:
        _check_resume_config(saved["config"], to_dict(cfg), resume, resume_with_changes,
                             (saved["world_size"], world.size))
    model, tokenizer = init_model(cfg, skeleton=engine.weights_from_rank0 and not world.main)
    check_same_model(world, model)  # before rank 0's weights go anywhere
    if cfg.lora.qlora:  # the base under the adapters in 4 bits
        quantize_base(model, PRECISION_DTYPE[cfg.precision])
    adapted = apply_lora(model, cfg.lora) if cfg.lora.enabled else []
    # the backend for the dtype the forwards run in (autocast's under bf16): FlashAttention-2 never in fp32
    log.info("stage %s: %s attention", cfg.name, model.use_attention(PRECISION_DTYPE[cfg.precision], world.device))
    processor = OmniProcessor.from_config(model.config, tokenizer, model.token_ids)
    records = training_records(cfg.data)
    evals = held_out(cfg.data)
    module = objective.prepare(model, tokenizer, processor, out_dir, records, evals, world)
    trainable = set_trainable(module, objective.trainable(trainable_globs(cfg.lora, cfg.trainable)))
    full_trained = check_full_training(trainable) if adapted else []
    if cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    if cfg.compile:
        model.compile_blocks()
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in module.parameters())
    flops = FlopCounter(model) if cfg.log.profile else None  # parameter counts before sharding
    engine.setup(module)
    if world.main:
        write_engine_config(engine, out_dir)

    counter = SkipCounter(max_fraction=cfg.data.max_bad_fraction)
    stream = training_stream(cfg.data, records, cfg.seed, objective.make, counter, world.rank, world.size)
    step = 0
    ckpt_root = out_dir / "checkpoints"
    if saved is not None:
        step = saved["step"]
        with counter.replaying(_own_counts(saved["counters"], world)):
            stream.restore(saved["samples"])  # re-split over this run's processes where they differ
        load_resumable(resume, saved, engine)  # last: the RNGs are the checkpoint's whatever the replay drew
        if world.main:  # rows after the checkpoint are about to be written again
            for name in (METRICS, EVALS, SAMPLES):
                _keep_rows_up_to(out_dir / name, step)
        log.info("resumed %s from %s at step %d (%d process(es), written by %d)", cfg.name, resume, step,
                 world.size, saved["world_size"])

    log.info("stage %s (%s): %d/%d parameters trainable (%s ...), %d steps of %d process(es) x %d x %d samples "
             "on %s%s", cfg.name, cfg.method, n_train, n_all, ", ".join(trainable[:3]), cfg.steps, world.size,
             cfg.batch.micro_batch, cfg.batch.grad_accum, engine.description,
             f", {len(evals)} held-out records" if evals else "")

    trackers = Trackers(cfg.log.trackers if world.main else [], out_dir, cfg.name, to_dict(cfg), step)

    def evaluate(at: int) -> dict:
        """Each rank scores every world-th held-out record and the shares' results are merged
        (engines that shard per module in lockstep: `_score_share`). Rank 0 writes."""
        scorer = engine.inference_module
        scorer.eval()
        share = evals[world.rank::world.size]
        log.info("held-out scoring at step %d: rank %d scores %d of %d records", at, world.rank, len(share), len(evals))
        with engine.autocast():
            mine = _score_share(objective, scorer, share, evals, engine, world)
        result = {"step": at, **merge_shares(world.gather(mine))}
        engine.train()
        if world.main:
            with open(out_dir / EVALS, "a") as f:
                f.write(json.dumps(result) + "\n")
        trackers.log(at, "eval", result)
        return result

    first = None
    if evals:  # the "before" numbers: measured now, or read back when resuming
        seen = (out_dir / EVALS).read_text().splitlines() if (out_dir / EVALS).is_file() else []
        first = json.loads(seen[0]) if step and seen else evaluate(step)

    peak = peak_tflops(world.device, cfg.precision, cfg.log.peak_tflops) if flops else None
    engine.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, disable=not progress, dynamic_ncols=True)
    t0 = window_t0 = time.time()
    window, window_tokens, window_flops = [], 0, 0.0
    over_budget = False
    data_wait = "-"  # the last log window's share of time spent waiting for data, on the bar
    metrics = open(out_dir / METRICS, "a") if world.main else None  # noqa: SIM115 - closed in finally
    samples_log = open(out_dir / SAMPLES, "a") if world.main and cfg.log.samples else None  # noqa: SIM115
    # the step's micro-batches made ahead in a background thread (data.prefetch), the same items in the same order
    feed = Feeder(stream, counter, objective.collate, lambda b: b.to(world.device), cfg.batch.micro_batch,
                  (cfg.steps - step) * cfg.batch.grad_accum, cfg.data.prefetch)
    try:
        while step < cfg.steps:
            batches, fill, taken = [], 0.0, []
            for _ in range(cfg.batch.grad_accum):
                micro = feed.next()
                batch = micro.batch
                taken += micro.taken
                if 0 < cfg.batch.tokens_per_pack < batch.input_ids.shape[1] and not over_budget:
                    over_budget = True  # said once: the memory plan assumed rows of tokens_per_pack tokens
                    log.warning("stage %s: a packed micro-batch of %d tokens exceeds batch.tokens_per_pack=%d, the row "
                                "omni plan budgets memory for; raise tokens_per_pack or lower batch.micro_batch",
                                cfg.name, batch.input_ids.shape[1], cfg.batch.tokens_per_pack)
                batches.append(batch)
                fill += micro.fill / cfg.batch.grad_accum
                if flops is not None:
                    lengths = objective.lengths(micro.made)
                    window_tokens += sum(lengths)
                    window_flops += flops(lengths, batch.media)
            # every unit of the step (label token, pair) weighs the same, whichever micro-batch or rank
            # holds it; engines that shard per module also learn which modalities any rank's step has
            local = [sum(objective.units(b) for b in batches)]
            local += [any(getattr(b.media, m) is not None for b in batches) for m in MODALITIES]
            summed = world.sum_all(local)
            per_rank = max(summed[0], 1) / world.size
            step_modalities = engine.modalities_to_run({m for m, n in zip(MODALITIES, summed[1:]) if n > 0})
            total, stats = 0.0, {}
            for i, batch in enumerate(batches):
                blank = tuple(sorted(m for m in step_modalities if getattr(batch.media, m) is None))
                with engine.micro_batch(last=i == len(batches) - 1):
                    with engine.autocast():
                        loss, s = objective.loss(engine.module, batch, per_rank, blank)
                    engine.backward(loss)
                total += loss.item()
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v / len(batches)
            total = world.sum(total) / world.size
            grad_norm = engine.step()
            step += 1
            window.append({"loss": total, "fill": fill, **stats})
            if cfg.log.samples:
                _log_samples(samples_log, step, world.gather(taken))
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", data_wait=data_wait)
            if step % cfg.log.interval == 0 or step == cfg.steps:
                samples, skipped = world.sum_all([micro.consumed, micro.counts[1]])
                mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                row = {"stage": cfg.name, "step": step, "loss": mean.pop("loss"),
                       "fill": round(mean.pop("fill"), 4),  # real tokens / batch tokens
                       "lr": engine.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "samples": int(samples), "skipped": int(skipped),
                       "elapsed_s": round(time.time() - t0, 2),
                       # the share of the window's wall time the step waited for its data
                       "data_wait": round(feed.wait_s / max(time.time() - window_t0, 1e-9), 4), **mean}
                if flops is not None:
                    row.update(_throughput(world, window_tokens, window_flops, window_t0, peak))
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if not progress:  # the bar shows the loss; without it, a console line
                        log.info("%s step %d/%d loss %.4f lr %.2e data wait %.1f%%", cfg.name, step, cfg.steps,
                                 row["loss"], row["lr"], 100 * row["data_wait"])
                trackers.log(step, "train", row)
                window, window_tokens, window_flops = [], 0, 0.0
                feed.wait_s, data_wait = 0.0, f"{row['data_wait']:.1%}"
                window_t0 = time.time()
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps and evals:
                evaluate(step)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < cfg.steps:
                paused = time.time()
                save_resumable(engine, tokenizer, step, world.gather(micro.state), ckpt_root, cfg.checkpoint.keep,
                               counters=world.gather(micro.counts), config=to_dict(cfg))
                window_t0 += time.time() - paused  # throughput counts training time only
    finally:
        feed.close()
        bar.close()
        for f in (metrics, samples_log):
            if f is not None:
                f.close()
    if counter.skipped:
        log.warning("stage %s skipped %d bad samples of %d", cfg.name, counter.skipped,
                    counter.skipped + counter.good)
    last = evaluate(step) if evals else None
    trackers.close()
    if world.main and evals:
        (out_dir / "eval.json").write_text(json.dumps({"before": first, "after": last}, indent=2))
    full = engine.full_state_dict()  # every rank takes part in gathering a sharded model
    if cfg.lora.qlora:  # merged into the dequantised base: the weights the adapters were trained over
        full = dequantized_state(model, model.state_dict())
    if world.main and adapted:  # merged into final/, the peft adapter into final/adapter/
        save_lora_final(model, init_model(cfg, skeleton=True)[0], tokenizer, out_dir / FINAL, full, cfg.lora,
                        adapted, full_trained, cfg.init_from)
    elif world.main:
        save_model_dir(module, tokenizer, out_dir / FINAL, full)
    if world.main:
        log.info("stage %s done in %.1f s -> %s", cfg.name, time.time() - t0, out_dir / FINAL)
    world.barrier()
    return out_dir / FINAL


# config keys a resume may change freely: they shape logging, checkpointing and held-out eval only
# (and where the first weights came from, which a resume no longer reads)
FREE_ON_RESUME = ("log.", "checkpoint.", "eval_interval", "data.eval", "data.prefetch", "init_from", "preset")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


@torch.no_grad()
def _score_share(objective, scorer, share: list, evals: list, engine, world: World) -> dict:
    """This rank's held-out result. Engines that shard per module gather weights in every forward,
    so there all ranks run the same number of batches (the most any rank's share makes) with the
    same modules (those any rank's batch has, the others on a blank input, as in a training step);
    a rank whose share has run out scores a filler batch (the first record) and drops its result."""
    if world.size == 1 or not engine.shards_modules:
        return objective.evaluate(scorer, share)
    own = list(chunks(share, objective.cfg.batch.micro_batch))
    parts = []
    for i in range(max(world.gather(len(own)))):
        batch = objective.eval_batch(own[i] if i < len(own) else evals[:1])
        present = world.sum_all([getattr(batch.media, m) is not None for m in MODALITIES])
        run = engine.modalities_to_run({m for m, n in zip(MODALITIES, present, strict=True) if n > 0})
        result = objective.score(scorer, batch, tuple(sorted(m for m in run if getattr(batch.media, m) is None)))
        if i < len(own):
            parts.append(result)
    return merge_shares(parts)


def _check_resume_config(saved: dict, now: dict, where: Path, allowed: bool, processes: tuple[int, int]) -> None:
    """Refuse (or, when allowed, log) a resume whose config differs where the run's exactness depends on it.
    `processes`: (the checkpoint's, this run's). The split of the global batch (processes x
    batch.micro_batch x batch.grad_accum) may change as long as the global batch stays: every step
    then trains on the same samples, with the loss weighed by the whole step's units."""
    old, new = _flat(saved), _flat(now)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(FREE_ON_RESUME)]
    split = ("batch.micro_batch", "batch.grad_accum")
    (p0, m0, a0), (p1, m1, a1) = ((p, d[split[0]], d[split[1]]) for p, d in zip(processes, (old, new), strict=True))
    hint = ""
    if p0 * m0 * a0 == p1 * m1 * a1:
        changed = [c for c in changed if not c.startswith(split)]
    else:
        changed.append(f"global batch (processes x batch.micro_batch x batch.grad_accum): {p0} x {m0} x {a0} = "
                       f"{p0 * m0 * a0} -> {p1} x {m1} x {a1} = {p1 * m1 * a1}")
        if (p0 * m0 * a0) % (p1 * m1) == 0:
            hint = f" (on {p1} process(es) batch.grad_accum={p0 * m0 * a0 // (p1 * m1)} keeps the global batch)"
    if not changed:
        return
    if not allowed:
        raise ConfigError(f"{where} was written with another config ({'; '.join(changed)}); resuming would not "
                          f"continue that run exactly{hint}. Train into a new --out folder, or pass "
                          "--resume-with-changes")
    log.warning("resuming %s with changed config: %s", where, "; ".join(changed))


def _own_counts(saved: list, world: World) -> list[int]:
    """This rank's [good, skipped] from the checkpoint's per-rank counts; on another number of
    processes rank 0 carries the totals (the budget's rate stays, the metrics' sums too)."""
    if len(saved) == world.size:
        return saved[world.rank]
    return [sum(int(c[i]) for c in saved) for i in (0, 1)] if world.main else [0, 0]


def _log_samples(out, step: int, per_rank: list[list]) -> None:
    """One samples.jsonl row: the step's raw samples over all ranks, [position or None, key and shard],
    by position in the shared sequence (data.partition: shard has none: then in rank order)."""
    if out is None:
        return
    rows = sorted((s for rank in per_rank for s in rank), key=lambda s: (s[0] is None, s[0] or 0))
    out.write(json.dumps({"step": step, "samples": [list(s) for s in rows]}) + "\n")
    out.flush()


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the JSONL rows a killed run wrote after its last checkpoint (atomically)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)


def _throughput(world: World, tokens: int, flops: float, since: float, peak: float | None) -> dict:
    """Window throughput over all ranks: LLM tokens (samples' own, no padding) and tokens/s, model
    TFLOP/s per device (omni/train/flops.py), MFU (None without a peak)."""
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    seconds = time.time() - since
    tokens, flops = world.sum_all([tokens, flops])
    per_device = flops / max(seconds, 1e-9) / world.size / 1e12
    sig = lambda x: float(f"{x:.4g}")
    return {"tokens": int(tokens), "tokens_per_s": sig(tokens / max(seconds, 1e-9)),
            "tflops_per_device": sig(per_device), "mfu": sig(per_device / peak) if peak else None}

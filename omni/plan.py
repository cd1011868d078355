"""Per-GPU memory plan for a stage, before launching it: will it fit on N GPUs of M GiB?

Accounting as omni's engines hold memory (bytes; N = data-parallel GPUs):
- weights: 4 bytes per trainable parameter (fp32: the master weights; autocast computes in bf16);
  frozen ones 2 bytes under `precision: bf16` on ddp and fsdp2, which hold them in bf16 (but the
  fp32 norms of whisper and open_clip), else 4 (DeepSpeed, fp32 stages) (omni/train/engines.py);
- gradients: 4 bytes per trainable parameter (fp32, like the parameters);
- optimizer: AdamW's two fp32 moments, 8 bytes per trainable parameter (no separate master copy:
  the fp32 parameters are it) — 16 bytes per trainable parameter in all, as in ZeRO's accounting;
- sharding: ddp replicates everything; ZeRO-2 shards gradients and optimizer state; ZeRO-3 and
  FSDP2 also shard the weights (each across N), and then hold gathered copies while a unit runs:
  the root unit (embeddings, LM head, projectors) through the step plus the two largest other
  units (the running one and the prefetched next), bf16 under FSDP2's bf16 policy, else fp32;
- activations of one micro-batch, per transformer (LLM over its rows of tokens, vision tower over
  its samples' tiles, audio tower over their windows; a packed micro-batch is one row of
  `tokens_per_pack` tokens holding `micro_batch` samples and all their media):
  s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", no sequence parallelism; the 5*a*s/h score term only for eager attention), or
  2*s*b*h per layer plus one full layer with activation checkpointing;
  doubled in fp32;
- logits: b*s*V*4 bytes (the fp32 logits the loss reads), or, above `CHUNKED_ABOVE_LOGITS`, one
  chunk's fp32 logits and their gradient (omni/model/lm_loss.py).
It is an estimate (no allocator fragmentation, no temporary buffers): keep ~10% headroom.

The model planned is the stage's own (its preset with `model_overrides`, or its `init_from` folder),
built on the meta device the way every training rank builds it (omni/model/architecture.py).
`refuse_if_it_cannot_fit` is the same plan at launch: a stage that cannot fit stops before any
weights are built, with the table and what to change.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.config import ConfigError
from omni.model.generate import computes_in_fp32
from omni.model.lm_loss import CHUNK_LOGITS, CHUNKED_ABOVE_LOGITS
from omni.model.table import meta_model
from omni.train.config import StageConfig
from omni.train.engines import LAYOUTS, fsdp_units, stage_layout

GIB = 1024 ** 3


@dataclass
class Plan:
    rows: list[tuple[str, float]]   # (component, GiB per GPU)
    gpu_gib: float

    @property
    def total(self) -> float:
        return sum(v for _, v in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.gpu_gib

    def table(self) -> str:
        lines = [f"{'component':<40}{'GiB/GPU':>10}"]
        lines += [f"{name:<40}{gib:>10.2f}" for name, gib in self.rows]
        lines.append(f"{'total':<40}{self.total:>10.2f}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict} in {self.gpu_gib:g} GiB (90% usable)")
        return "\n".join(lines)


def transformer_activation_bytes(tokens: int, batch: int, hidden: int, heads: int, layers: int,
                                 checkpointing: bool, bytes_per_value: int, attention_scores: bool) -> float:
    """Korthikanti et al. per-layer activation memory, scaled from 16-bit to the given width.
    Fused attention kernels (FlashAttention, SDPA's memory-efficient path) never store the
    a*s*s score matrix, so its 5*a*s/h term counts only for eager attention."""
    scores = 5 * heads * tokens / hidden if attention_scores else 0
    full_layer = tokens * batch * hidden * (34 + scores) * bytes_per_value / 2
    if checkpointing:
        return layers * 2 * tokens * batch * hidden * bytes_per_value / 2 + full_layer
    return layers * full_layer


def plan_stage(cfg: StageConfig, gpus: int, gpu_gib: float, engine: str | None = None, seq_len: int = 4096) -> Plan:
    """`engine`: a memory layout of omni/train/engines.py (`LAYOUTS`: what each shards over the N
    GPUs); None: the stage's own (`engine`, `zero_stage`)."""
    engine = engine or stage_layout(cfg)
    if engine not in LAYOUTS:
        raise ConfigError(f"engine {engine!r}: choose one of {list(LAYOUTS)}")
    if gpus < 1 or gpu_gib <= 0:
        raise ValueError("need gpus >= 1 and gpu memory > 0")
    model = stage_meta_model(cfg)
    names = {n: p.numel() for n, p in model.named_parameters()}
    trains = lambda name: any(fnmatch.fnmatchcase(name, g) for g in cfg.trainable)  # noqa: E731
    trainable, total = sum(n for name, n in names.items() if trains(name)), sum(names.values())
    frozen_bytes = 2 if cfg.precision == "bf16" and engine in ("ddp", "fsdp2") else 4
    weight_bytes = sum(p.numel() * (4 if trains(f"{m}.{n}".lstrip(".")) or computes_in_fp32(mod) else frozen_bytes)
                       for m, mod in model.named_modules() for n, p in mod.named_parameters(recurse=False))
    width = 2 if cfg.precision == "bf16" else 4          # activations: autocast computes in bf16
    shard_w, shard_g, shard_o = (gpus if s else 1 for s in LAYOUTS[engine])

    llm = model.llm.config
    # a packed micro-batch is one row of tokens_per_pack tokens holding all micro_batch samples:
    # the LLM runs 1 row, the towers every sample's media all the same
    tokens = cfg.batch.tokens_per_pack or seq_len
    samples, ckpt = cfg.batch.micro_batch, cfg.activation_checkpointing
    b = 1 if cfg.batch.tokens_per_pack else samples
    image = model.encoders["image"]
    vis_blocks = [m for m in image.modules() if type(m).__name__ in ("ResidualAttentionBlock", "Block")]
    vis_heads = next(getattr(m, "num_heads") for m in image.modules() if hasattr(m, "num_heads"))
    audio = model.encoders["audio"].encoder
    eager = model.config.llm.attn_implementation == "eager"
    act = transformer_activation_bytes(tokens, b, llm.hidden_size, llm.num_attention_heads,
                                       llm.num_hidden_layers, ckpt, width, eager)
    cfg_tiles = max(1, model.config.anyres.max_tiles + int(model.config.anyres.thumbnail))
    tiles = samples * cfg_tiles
    act += transformer_activation_bytes(image.num_patches, tiles, image.out_dim, vis_heads,
                                        len(vis_blocks), ckpt, width, eager)
    act += transformer_activation_bytes(audio.positional_embedding.shape[0], samples, model.encoders["audio"].out_dim,
                                        audio.blocks[0].attn.n_head, len(audio.blocks), ckpt, width, eager)
    rows = [
        (f"weights (fp32{', frozen bf16' if frozen_bytes == 2 and trainable < total else ''})",
         weight_bytes / shard_w / GIB),
        ("gradients (fp32)", trainable * 4 / shard_g / GIB),
        ("optimizer (AdamW moments)", trainable * 8 / shard_o / GIB),
    ]
    if shard_w > 1:
        gathered = 2 if engine == "fsdp2" and cfg.precision == "bf16" else 4
        rows.append(("gathered units (root + 2 largest)", _gathered_params(model) * gathered / GIB))
    logits = b * tokens * llm.vocab_size
    rows += [
        (f"activations (b={b}, {tokens} tok, {samples} x {cfg_tiles} tiles)", act / GIB),
        ("logits (fp32, chunked)", 2 * CHUNK_LOGITS * 4 / GIB) if logits > CHUNKED_ABOVE_LOGITS
        else ("logits (fp32)", logits * 4 / GIB),
    ]
    return Plan(rows, gpu_gib)


def stage_meta_model(cfg: StageConfig):
    """The stage's model on the meta device: its `init_from` folder when it is one (no weights read),
    else its preset with `model_overrides` (a schedule's `init_from: previous` starts from the same
    architecture as the stage before, which the preset describes)."""
    if cfg.init_from and Path(cfg.init_from).is_dir():
        from omni.model.load import load_model

        with torch.device("meta"):
            return load_model(cfg.init_from, cfg.model_overrides, weights=False)[0]
    if cfg.preset is None:
        raise ConfigError(f"init_from {cfg.init_from!r} is not a model folder and there is no preset to plan from")
    return meta_model(cfg.preset, cfg.model_overrides)


GPU_MEM_ENV = "OMNI_GPU_MEM_GIB"  # plan a launch against this many GiB per device (default: the GPU's own)


def refuse_if_it_cannot_fit(cfg: StageConfig) -> None:
    """Stop a launch that `omni plan` says cannot fit, before any weights are built or any collective:
    the plan for this launch's processes (WORLD_SIZE, set by torchrun) on this GPU's memory (or
    `OMNI_GPU_MEM_GIB`), and what to change. Nothing to check against on a CPU without
    `OMNI_GPU_MEM_GIB`."""
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    budget = os.environ.get(GPU_MEM_ENV)
    if budget is not None:
        try:
            gpu_gib = float(budget)
        except ValueError:
            raise ConfigError(f"{GPU_MEM_ENV}={budget!r}: expected GiB per device, e.g. 80") from None
    elif torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0"))
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    else:
        return
    plan = plan_stage(cfg, gpus, gpu_gib)
    if plan.fits:
        return
    engine = stage_layout(cfg)
    advice = ["more GPUs: torchrun --nproc_per_node N (and --nnodes) shards or splits the work"]
    if engine in ("ddp", "zero2"):
        advice.append("engine=fsdp2, or engine=deepspeed zero_stage=3: shard the weights too")
    if not cfg.activation_checkpointing:
        advice.append("activation_checkpointing=true")
    if cfg.batch.tokens_per_pack:
        advice.append("a smaller batch.tokens_per_pack")
    elif cfg.batch.micro_batch > 1:
        advice.append("a smaller batch.micro_batch (with a larger batch.grad_accum for the same step)")
    if cfg.precision != "bf16":
        advice.append("precision=bf16")
    raise ConfigError(f"stage {cfg.name} does not fit: `omni plan` for {gpus} x {gpu_gib:g} GiB, engine {engine}:\n"
                      f"{plan.table()}\nTo fit, try: " + "; ".join(advice)
                      + f" (check with `omni plan STAGE.yaml --gpus N --gpu-mem {gpu_gib:g}`)")


def _gathered_params(model) -> int:
    """Parameters a sharding engine holds unsharded at once: the root unit (what the LLM layers and
    towers leave over) for the whole step, plus the running and the prefetched unit."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    layers, units = fsdp_units(model)
    towers = list(model.encoders.values())
    blocks = [u for u in units if not any(u is t for t in towers)]
    in_tower = lambda t: sum(count(b) for b in blocks if any(b is m for m in t.modules()))  # noqa: E731
    own = [count(m) for m in layers + blocks] + [count(t) - in_tower(t) for t in towers]
    root = count(model) - sum(count(m) for m in layers) - sum(count(t) for t in towers)
    return root + sum(sorted(own, reverse=True)[:2])

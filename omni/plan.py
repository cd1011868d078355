"""Per-GPU memory plan for a stage, before launching it: will it fit on N GPUs of M GiB?

Accounting as omni's engines hold memory (bytes; N = data-parallel GPUs):
- weights: 4 bytes per trainable parameter (fp32: the master weights; autocast computes in bf16);
  frozen ones 2 bytes under `precision: bf16` on ddp and fsdp2, which hold them in bf16 (but the
  fp32 norms of whisper and open_clip), else 4 (DeepSpeed, fp32 stages) (omni/train/engines.py);
- LoRA: the adapters (rank x (in + out) per adapted layer) are trainable parameters; a QLoRA base
  holds the LLM's Linear weights (the LM head aside) in NF4, ~0.52 bytes each (omni/train/qlora.py);
- gradients: 4 bytes per trainable parameter (fp32, like the parameters);
- optimizer: AdamW's two fp32 moments, 8 bytes per trainable parameter (no separate master copy:
  the fp32 parameters are it) — 16 bytes per trainable parameter in all, as in ZeRO's accounting;
  but DeepSpeed's ZeRO-2 steps an fp32 clone of its partition of the flattened weights (4 more
  bytes per trainable parameter, sharded; ZeRO-3 under autocast steps the partition itself), and
  its gradients pass through two fp32 reduction buckets of `reduce_bucket_size` elements
  (allocated whole on a GPU; on a CPU resident where gradients were copied in: one bucket's worth);
- autocast's bf16 copies (bf16 stages): autocast caches the bf16 cast of every fp32 trainable
  weight a matmul reads, and backward keeps it: 2 bytes per such weight, of the whole (gathered)
  weight (FSDP2's bf16 policy gathers the LLM and root in bf16 already: the towers' only);
- the optimizer step adds nothing: omni's AdamW is torch's fused kernel, which updates weights and
  moments in place (no temporaries on CUDA or CPU; the per-tensor and foreach paths would add one
  to three fp32 copies of a tensor or of every trainable parameter);
- sharding: ddp replicates everything; ZeRO-2 shards gradients and optimizer state; ZeRO-3 and
  FSDP2 also shard the weights (each across N), and then hold gathered copies while a unit runs
  (in buffers of their own: on one process too):
  the root unit (embeddings, LM head, projectors) through the step plus the two largest other
  units (the running one and the prefetched next), bf16 under FSDP2's bf16 policy, else fp32;
- activations of one micro-batch, per transformer (LLM over its rows of tokens, vision tower over
  every sample's largest image (AnyRes tiles) or video (`video.max_frames` frames), audio tower
  over its `audio.max_windows` windows, no more than the row's tokens hold (`media_per_micro_batch`);
  with an `omni data stats` file, only the media kinds the stage's datasets hold, and their longest
  sample as the row length; a packed micro-batch is one row of `tokens_per_pack` tokens holding
  `micro_batch` samples and all their media; a tower none of whose parameters train keeps none:
  its input needs no gradient, so autograd records nothing there):
  s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", no sequence parallelism; the 5*a*s/h score term only for eager attention; their
  34 holds 19 for a 4h GELU MLP, which a SwiGLU LLM MLP of width r*h replaces by 2 + 8r), or
  2*s*b*h per layer plus one full layer with activation checkpointing;
  doubled in fp32;
- logits: b*s*V*4 bytes (the fp32 logits the loss reads), or, above `CHUNKED_ABOVE_LOGITS`, one
  chunk's fp32 logits and their gradient (omni/model/lm_loss.py);
- preference objectives (dpo, rm): a micro-batch of b pairs is 2b rows (chosen, then rejected),
  whose sequence log-probs read the whole rows' fp32 logits (never chunked);
  DPO's reference model (`dpo.reference` or `init_from`, not for reference-free losses) is loaded
  whole in fp32 on every process (omni/align/objectives/dpo.py): with `dpo.precompute_ref` it
  scores the pairs before training and is freed (a phase of its own: the plan's total is the larger
  of the two phases), else it stays next to the policy through training, its logits of the same
  rows next to the policy's.
It is an estimate (no allocator fragmentation, no temporary buffers): keep ~10% headroom.

The model planned is the stage's own (its preset with `model_overrides`, or its `init_from` folder),
built on the meta device the way every training rank builds it (omni/model/architecture.py).
`refuse_if_it_cannot_fit` is the same plan at launch: a stage that cannot fit stops before any
weights are built, with the table and what to change.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni.align.losses import REFERENCE_FREE
from omni.config import ConfigError
from omni.model.generate import computes_in_fp32
from omni.model.lm_loss import CHUNK_LOGITS, CHUNKED_ABOVE_LOGITS
from omni.model.table import meta_model
from omni.train.config import StageConfig
from omni.train.engines import LAYOUTS, fsdp_units, stage_layout
from omni.train.lora import target_modules
from omni.train.qlora import NF4_BYTES, base_linears

GIB = 1024 ** 3
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size (omni's config keeps it)
PAIRED = ("dpo", "rm")  # objectives whose micro-batch of b pairs is 2b rows (omni/align/objectives/pairs.py)


@dataclass
class Plan:
    rows: list[tuple[str, float]]   # (component, GiB per GPU) from forward through backward
    gpu_gib: float
    before: list[tuple[str, float]] = field(default_factory=list)  # a phase before training (DPO's reference)

    @property
    def total(self) -> float:
        return max(sum(v for _, v in self.rows), sum(v for _, v in self.before))

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.gpu_gib

    def table(self) -> str:
        lines = [f"{'component':<48}{'GiB/GPU':>10}"]
        if self.before:
            lines += [f"{'before: ' + name:<48}{gib:>10.2f}" for name, gib in self.before]
            lines.append(f"{'(freed before training)':<48}{sum(v for _, v in self.before):>10.2f}")
        lines += [f"{name:<48}{gib:>10.2f}" for name, gib in self.rows]
        lines.append(f"{'total':<48}{self.total:>10.2f}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict} in {self.gpu_gib:g} GiB (90% usable)")
        return "\n".join(lines)


KORTHIKANTI_MLP = 19  # values per token and hidden unit a 4h GELU MLP keeps (of Korthikanti et al.'s 34)


def gated_mlp_values(hidden: int, intermediate: int) -> float:
    """Values per token and hidden unit a gated (SwiGLU) MLP of width r*h keeps in 16-bit: its input
    (2), the gate's output, its activation, the up projection and their product (2r each). At
    Qwen2-7B's r = 5.3 that is 44, more than twice the 4h GELU MLP's 19 Korthikanti et al. count."""
    return 2 + 8 * intermediate / hidden


def transformer_activation_bytes(tokens: int, batch: int, hidden: int, heads: int, layers: int,
                                 checkpointing: bool, bytes_per_value: int, attention_scores: bool,
                                 mlp: float = KORTHIKANTI_MLP) -> float:
    """Korthikanti et al. per-layer activation memory, scaled from 16-bit to the given width: 34
    values per token and hidden unit, 15 of attention and norms and `mlp` of the MLP (19 for their
    4h GELU MLP; `gated_mlp_values` for a SwiGLU one). Fused attention kernels (FlashAttention,
    SDPA's memory-efficient path) never store the a*s*s score matrix, so its 5*a*s/h term counts
    only for eager attention."""
    scores = 5 * heads * tokens / hidden if attention_scores else 0
    full_layer = tokens * batch * hidden * (34 - KORTHIKANTI_MLP + mlp + scores) * bytes_per_value / 2
    if checkpointing:
        return layers * 2 * tokens * batch * hidden * bytes_per_value / 2 + full_layer
    return layers * full_layer


def plan_stage(cfg: StageConfig, gpus: int, gpu_gib: float, engine: str | None = None, seq_len: int = 4096,
               stats: str | Path | None = None, device: str = "cuda") -> Plan:
    """`engine`: a memory layout of omni/train/engines.py (`LAYOUTS`: what each shards over the N
    GPUs); None: the stage's own (`engine`, `zero_stage`). `stats`: an `omni data stats` stats.json
    of the stage's data: its datasets' longest sample is the unpacked `seq_len`, and only the media
    kinds they hold are planned (`stats_for_stage`). `device`: where the steps run ("cuda", or
    "cpu": DeepSpeed's reduction buckets are resident only where gradients were copied in)."""
    modalities = MEDIA_KINDS
    if stats is not None:
        seq_len, modalities = stats_for_stage(cfg, stats)
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
    weights_label = "fp32" + (", frozen bf16" if frozen_bytes == 2 and trainable < total else "")
    adapted = set(target_modules(model, cfg.lora.targets)) if cfg.lora.enabled else set()
    if cfg.lora.enabled:  # the adapters train; a QLoRA base holds the LLM's Linear weights in NF4
        adapters = sum(cfg.lora.rank * (m.in_features + m.out_features)
                       for name, m in model.named_modules() if name in adapted)
        trainable += adapters
        weight_bytes += 4 * adapters
        if cfg.lora.qlora:
            quantized = sum(m.weight.numel() for _, m in base_linears(model))
            weight_bytes += quantized * (NF4_BYTES - frozen_bytes)
            weights_label += ", LLM base 4-bit"
    width = 2 if cfg.precision == "bf16" else 4          # activations: autocast computes in bf16
    shard_w, shard_g, shard_o = (gpus if s else 1 for s in LAYOUTS[engine])

    llm = model.llm.config
    # a packed micro-batch is one row of tokens_per_pack tokens holding all micro_batch samples:
    # the LLM runs 1 row, the towers every sample's media all the same
    tokens = cfg.batch.tokens_per_pack or seq_len
    # a preference micro-batch of b pairs is 2b sequences (chosen, rejected), each with the prompt's media
    pairs = 2 if cfg.method in PAIRED else 1
    samples, ckpt = pairs * cfg.batch.micro_batch, cfg.activation_checkpointing
    b = 1 if cfg.batch.tokens_per_pack else samples
    image = model.encoders["image"]
    vis_blocks = [m for m in image.modules() if type(m).__name__ in ("ResidualAttentionBlock", "Block")]
    vis_heads = next(getattr(m, "num_heads") for m in image.modules() if hasattr(m, "num_heads"))
    audio = model.encoders["audio"].encoder
    eager = model.config.llm.attn_implementation == "eager"
    gated = any(hasattr(m, "gate_proj") for m in model.llm.modules())  # Qwen2, Llama: a SwiGLU MLP
    act = transformer_activation_bytes(tokens, b, llm.hidden_size, llm.num_attention_heads, llm.num_hidden_layers,
                                       ckpt, width, eager, gated_mlp_values(llm.hidden_size, llm.intermediate_size)
                                       if gated else KORTHIKANTI_MLP)
    images, windows = media_per_micro_batch(model, samples, b, tokens, modalities)
    # a tower keeps activations for backward only when something in it trains: a frozen tower's
    # input (pixels, mel frames) needs no gradient, so autograd records nothing there
    tower_trains = {kind: any(trains(n) for n in names if n.startswith(f"encoders.{kind}."))
                    or any(a.startswith(f"encoders.{kind}.") for a in adapted) for kind in ("image", "audio")}
    images, windows = images * tower_trains["image"], windows * tower_trains["audio"]
    act += transformer_activation_bytes(image.num_patches, images, image.out_dim, vis_heads,
                                        len(vis_blocks), ckpt, width, eager)
    act += transformer_activation_bytes(audio.positional_embedding.shape[0], windows, model.encoders["audio"].out_dim,
                                        audio.blocks[0].attn.n_head, len(audio.blocks), ckpt, width, eager)
    rows = [
        (f"weights ({weights_label})", weight_bytes / shard_w / GIB),
        ("gradients (fp32)", trainable * 4 / shard_g / GIB),
        ("optimizer (AdamW moments)", trainable * 8 / shard_o / GIB),
    ]
    if engine == "zero2":  # DeepSpeed's ZeRO-2 steps an fp32 clone of its partition, not the module's weights
        rows.append(("master weights (ZeRO-2's fp32 partition)", trainable * 4 / shard_o / GIB))
        # gradients pass through its two reduction buckets (overlap_comm) on their way to the partition:
        # allocated whole on a GPU, resident on a CPU only where gradients were copied in
        bucket = 2 * DEEPSPEED_REDUCE_BUCKET if device == "cuda" else min(trainable, DEEPSPEED_REDUCE_BUCKET)
        rows.append(("gradient reduction buckets (fp32)", 4 * bucket / GIB))
    dpo_reference = cfg.method == "dpo" and cfg.dpo.loss_type not in REFERENCE_FREE
    reference = ("reference model (fp32, whole)", 4 * total / GIB)  # the policy's architecture
    if dpo_reference and not cfg.dpo.precompute_ref:  # held next to the policy through training
        rows.append(reference)
    if LAYOUTS[engine][0]:  # gathered into buffers of their own, one process too; freed by the optimizer step
        gathered = 2 if engine == "fsdp2" and cfg.precision == "bf16" else 4
        rows.append(("gathered units (root + 2 largest)", _gathered_params(model) * gathered / GIB))
    if cfg.precision == "bf16":  # autocast keeps a bf16 copy of every fp32 trainable matmul weight it casts
        cast = autocast_copies(model, trains, adapted, cfg.lora.rank, engine)
        rows.append(("bf16 copies of trainable weights (autocast)", 2 * cast / GIB))  # of gathered weights: whole
    logits = b * tokens * llm.vocab_size
    if cfg.method in PAIRED:  # sequence log-probs read every row's whole logits (no labels: no chunked loss)
        logits_row = ("logits (fp32, whole rows)", logits * 4 / GIB)
    elif logits > CHUNKED_ABOVE_LOGITS:
        logits_row = ("logits (fp32, chunked)", 2 * CHUNK_LOGITS * 4 / GIB)
    else:
        logits_row = ("logits (fp32)", logits * 4 / GIB)
    rows += [(f"activations (b={b}, {tokens} tok, {images} img, {windows} aud)", act / GIB), logits_row]
    before = []
    if dpo_reference and cfg.dpo.precompute_ref:
        before = [reference, logits_row]   # no-grad scoring: its logits, no activations kept
    elif dpo_reference:  # its logits of the same rows next to the policy's
        rows.append(("reference's logits (fp32, whole rows)", logits_row[1]))
    return Plan(rows, gpu_gib, before)


def autocast_copies(model, trains, adapted: set, rank: int, engine: str) -> int:
    """Parameters autocast casts to bf16 and keeps (its cache holds casts of fp32 leaf tensors that
    require grad; autograd keeps them for backward): trainable weights and biases of the matmul
    layers (not embeddings, not norms) and LoRA adapters. FSDP2's bf16 policy gathers the LLM
    layers and the root in bf16 already: only the towers' are cast there."""
    count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding) or type(mod).__name__.endswith(("Norm", "NormFp32")):
            continue
        if engine == "fsdp2" and not name.startswith("encoders."):
            continue
        count += sum(p.numel() for n, p in mod.named_parameters(recurse=False) if trains(f"{name}.{n}".lstrip(".")))
        if name in adapted:
            count += rank * (mod.in_features + mod.out_features)
    return count


MEDIA_KINDS = ("image", "video", "audio")


def media_per_micro_batch(model, samples: int, rows: int, tokens: int, modalities=MEDIA_KINDS) -> tuple[int, int]:
    """(vision tower images, audio tower windows) of a micro-batch at most, as the processor makes
    them (omni/model/processor.py): a sample's image is its AnyRes tiles (thumbnail included), its
    video `video.max_frames` frames, both through the vision tower; its audio `audio.max_windows`
    windows. Every tile, frame and window puts its tokens in the sample's row, so a micro-batch of
    `rows` rows of `tokens` tokens holds no more than those tokens allow."""
    cfg = model.config
    tiles = max(1, cfg.anyres.max_tiles + int(cfg.anyres.thumbnail))
    per_sample = max(tiles if "image" in modalities else 0, cfg.video.max_frames if "video" in modalities else 0)
    unit = min(model.image_tokens(), model.video_tokens(1))
    images = min(samples * per_sample, rows * (tokens // max(1, unit)))
    audio = model.encoders["audio"]
    windows = 0
    if "audio" in modalities:
        window_tokens = model.audio_window_tokens(audio.valid_frames(audio.window_samples))
        windows = min(samples * cfg.audio.max_windows, rows * (tokens // max(1, window_tokens)))
    return images, windows


def stats_for_stage(cfg: StageConfig, stats: str | Path) -> tuple[int, tuple[str, ...]]:
    """(longest sample in tokens, media kinds) of the stage's datasets in an `omni data stats`
    stats.json (its `datasets` entries: `tokens.total.max`, `modality_mix`)."""
    import json

    try:
        entries = json.loads(Path(stats).read_text())["datasets"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{stats}: not a stats.json of `omni data stats` ({e}); write one with "
                          "`omni data stats MANIFEST --out DIR`") from None
    wanted = set(cfg.data.datasets or {})
    mine = [d for d in entries if not wanted or d.get("name") in wanted]
    missing = wanted - {d.get("name") for d in mine}
    if not mine or missing:
        raise ConfigError(f"{stats}: no stats for the stage's datasets {sorted(missing or wanted)}; run "
                          "`omni data stats` on the stage's manifest")
    longest = max(int(d["tokens"]["total"]["max"]) for d in mine)
    kinds = {k for d in mine for mix in d.get("modality_mix", {}) for k in mix.split("+")}
    return max(1, longest), tuple(k for k in MEDIA_KINDS if k in kinds)


def stage_meta_model(cfg: StageConfig):
    """The stage's model on the meta device: its `init_from` folder when it is one (no weights read),
    else its preset with `model_overrides` (a schedule's `init_from: previous` starts from the same
    architecture as the stage before, which the preset describes)."""
    if cfg.init_from and Path(cfg.init_from).is_dir():
        from omni.model.load import load_model

        with torch.device("meta"):
            return load_model(cfg.init_from, cfg.model_overrides, weights=False)[0]
    if cfg.preset is None:
        raise ConfigError(f"init_from {cfg.init_from!r} is not a model folder and there is no preset to plan from; "
                          "add preset=NAME (e.g. preset=7b) to plan its architecture")
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

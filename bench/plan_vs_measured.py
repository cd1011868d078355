"""`omni plan` against reality: the planner's per-process peak vs the measured peak of real steps.

Usage: python bench/plan_vs_measured.py [--rows NAME ...] [--tokens 256] [--steps 2] [--threads 2] [--parts]
Every row is a stage of stages/tiny/ or an align config of omni/align/configs/ (random init, one
process, the named engine) with its LLM widened to Qwen2-7B's attention width (hidden 3584, 28
heads, 4 KV heads) at reduced depth (1 layer) and a reduced MLP and vocabulary (`WIDE`), so that the
fully trained rows stay under ~4 GiB on a shared CPU. The tower rows also widen the tower they train
to the 7B preset's: the vision tower to SigLIP-SO400M's (384 px, patch 14, width 1152, 16 heads,
MLP 4304; 2 blocks) with AnyRes 2x2 tiles + thumbnail, the audio tower to whisper-large-v3's
(128 mels, 1500 frames per 30 s window, width 1280, 20 heads; 2 blocks). Each row runs in a fresh
subprocess: the stage's objective, engine and model as the trainer builds them, then `--steps` real
steps (forward, backward, optimizer) of micro-batch 2 (samples, or preference pairs) of `--tokens`
words and the row's media.

Both sides count the same thing: the memory a training process holds for the model and the step,
above what it held before building it. Measured: the peak resident memory (VmHWM) over the steps,
reset (/proc/self/clear_refs) after the engine is set up, minus the resident memory after imports,
tokenizer and samples, before the model is built. glibc's malloc is told to map every block of
64 KiB or more on its own (`MALLOC_MMAP_THRESHOLD_`), so a freed tensor leaves the resident set at
once, as it leaves torch.cuda.max_memory_allocated on a GPU: without it glibc keeps freed blocks
under its raised threshold in the heap (the build's fp32 copy of frozen parts, earlier steps'
activations) and the resident peak counts memory no tensor holds. Planned: `plan_stage`'s total for
1 process on the CPU with the row's engine, the samples' real length and their media kinds (a
stats file of the `omni data stats` form naming them).
`--parts` also prints, per row, the plan's table and the measured parts: the exact bytes of the
parameters (by dtype), gradients and optimizer state, and the peak of each phase of the last step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
# Qwen2-7B's attention and context at 1 layer; MLP and vocabulary cut so that full training fits ~4 GiB on CPU
WIDE = ["llm.hf_config.hidden_size=3584", "llm.hf_config.num_attention_heads=28",
        "llm.hf_config.num_key_value_heads=4", "llm.hf_config.num_hidden_layers=1",
        "llm.hf_config.intermediate_size=4736", "llm.hf_config.vocab_size=8192",
        "llm.hf_config.max_position_embeddings=32768"]
# the 7B preset's towers at 2 blocks: SigLIP-SO400M-384's vision width, whisper-large-v3's audio width
SIGLIP = ["image.vision_cfg.image_size=384", "image.vision_cfg.patch_size=14", "image.vision_cfg.width=1152",
          "image.vision_cfg.head_width=72", "image.vision_cfg.mlp_ratio=3.7361", "image.vision_cfg.layers=2",
          "anyres.max_tiles=4", "anyres.thumbnail=true"]
WHISPER = ["audio.n_mels=128", "audio.n_ctx=1500", "audio.n_state=1280", "audio.n_head=20", "audio.n_layer=2",
           "audio.max_windows=1"]
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}  # freed tensors leave the resident set (see above)


@dataclass(frozen=True)
class Row:
    config: str                    # a stage or align config, relative to the repository
    overrides: tuple[str, ...]     # the stage's engine and precision
    # each sample's media: image (one tile), tiles (AnyRes 2x2 + thumbnail), audio (one 30 s window),
    # omni (an image, a video of max_frames frames and max_windows audio windows: every modality's
    # parameters get gradients), pairs (text preference pairs)
    media: str
    model: tuple[str, ...] = ()    # model overrides on top of WIDE (the towers' real widths)


TINY, ALIGN = "stages/tiny/", "omni/align/configs/"
ROWS = {
    "sft ddp fp32": Row(TINY + "2_sft.yaml", ("engine=ddp", "precision=fp32"), "omni"),
    "sft fsdp2 fp32": Row(TINY + "2_sft.yaml", ("engine=fsdp2", "precision=fp32"), "omni"),
    "sft zero2 fp32": Row(TINY + "2_sft.yaml", ("engine=deepspeed", "zero_stage=2", "precision=fp32"), "omni"),
    "projector ddp bf16": Row(TINY + "1a_image_projector.yaml", ("engine=ddp", "precision=bf16"), "image"),
    # the LLM's MLP at Qwen2-7B's width (SwiGLU, 5.3x hidden): a long row's activations dominate
    "projector ddp fp32 mlp18944": Row(TINY + "1a_image_projector.yaml", ("engine=ddp", "precision=fp32"), "image",
                                       ("llm.hf_config.intermediate_size=18944",)),
    "dpo ddp fp32": Row(ALIGN + "tiny_dpo.yaml", ("engine=ddp", "precision=fp32", "dpo.precompute_ref=false"),
                        "pairs"),
    "vit ddp fp32": Row(TINY + "1b_image_vit.yaml", ("engine=ddp", "precision=fp32"), "tiles", tuple(SIGLIP)),
    "audio ddp fp32": Row(TINY + "1e_audio.yaml", ("engine=ddp", "precision=fp32"), "audio", tuple(WHISPER)),
}


def _status(key: str) -> int:
    """A line of /proc/self/status in bytes (VmRSS: now; VmHWM: the peak since the last reset)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def stage_config(row: Row, model_dir: str | None = None):
    """The row's stage: one process, micro-batch 2, unpacked, no checkpointing, the LLM widened (a
    preset stage) or `model_dir` (a wide model folder: the align rows start from one)."""
    from omni.train.config import load_stage

    start = [f"init_from={model_dir}"] if model_dir else ["init_from=null", "data.manifest=unused.yaml"]
    cfg = load_stage(ROOT / row.config, [*start, "batch.micro_batch=2", "batch.grad_accum=1", "batch.tokens_per_pack=0",
                                         "activation_checkpointing=false", *row.overrides])
    if not model_dir:
        cfg.model_overrides = [*cfg.model_overrides, *WIDE, *row.model]
    return cfg


def save_wide_model(folder: str) -> None:
    """The tiny preset with `WIDE`, random init, as a model folder (the align rows' init_from)."""
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    model, tokenizer = OmniModel.from_config(build_preset("tiny", WIDE))
    model.save_pretrained(folder, tokenizer)


def _samples(row: Row, model, proc, texts, rng, objective):
    """The row's samples: chat turns with its media (or preference pairs), made as the trainer makes them."""
    import numpy as np
    from PIL import Image

    if row.media == "pairs":
        return [objective.make({"prompt": t[: len(t) // 3], "chosen": t[len(t) // 3:], "rejected": t[: len(t) // 2],
                                "__where__": f"pair {i}"}) for i, t in enumerate(texts)]
    side, cfg = model.encoders["image"].image_size, model.config
    picture = lambda n: Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8))  # noqa: E731
    sound = lambda windows: (0.1 * rng.standard_normal(  # noqa: E731
        windows * model.encoders["audio"].window_samples)).astype(np.float32)
    media, tag = {  # AnyRes: a square image twice the tile picks the 2x2 grid (+ thumbnail)
        "image": (lambda: {"image": [picture(side)]}, "<image>"),
        "tiles": (lambda: {"image": [picture(2 * side)]}, "<image>"),
        "audio": (lambda: {"audio": [sound(1)]}, "<audio>"),
        "omni": (lambda: {"image": [picture(side)], "video": [[picture(side) for _ in range(cfg.video.max_frames)]],
                          "audio": [sound(cfg.audio.max_windows)]}, "<image> <video> <audio>"),
    }[row.media]
    return [proc([{"role": "user", "content": f"{tag} " + t[: len(t) // 4]},
                  {"role": "assistant", "content": t[len(t) // 4:]}], media()) for t in texts]


def _bytes(tensors) -> int:
    """Bytes of the tensors' storages, each once (views of one flat buffer share it); a DTensor's local shard."""
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def measure(row: Row, tokens: int, steps: int, threads: int, model_dir: str | None = None) -> dict:
    """Run in a fresh process: `steps` trainer steps of the row; peak resident memory above the set-up."""
    import numpy as np
    import torch

    from omni.align.objectives import OBJECTIVES
    from omni.distributed import World
    from omni.model.omni_model import PRECISION_DTYPE
    from omni.model.processor import OmniProcessor
    from omni.tiny_world import vocabulary
    from omni.train.engines import build_engine
    from omni.train.optim import set_trainable
    from omni.train.trainer import init_model

    torch.set_num_threads(threads)
    cfg = stage_config(row, model_dir)
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
    examples = _samples(row, model, proc, texts, rng, objective)
    parts = {"set-up (resident)": _status("VmRSS") - before}
    _reset_peak()  # the steps' peak from here
    peak, losses = 0, []
    for step in range(steps):
        batch, _ = objective.collate(examples[2 * step: 2 * step + 2])
        with engine.micro_batch(last=True):
            with engine.autocast():
                loss, _ = objective.loss(engine.module, batch, float(objective.units(batch)))
            parts["forward peak"] = _status("VmHWM") - before
            engine.backward(loss)
        parts["backward peak"] = _status("VmHWM") - before
        peak = max(peak, _status("VmHWM"))
        _reset_peak()
        engine.step()
        parts["optimizer step peak"] = _status("VmHWM") - before
        peak = max(peak, _status("VmHWM"))
        losses.append(float(loss.detach()))
        if step < steps - 1:
            _reset_peak()
    params = list(model.parameters())
    for dtype in sorted({str(p.dtype) for p in params}):
        parts[f"parameters {dtype}"] = _bytes(p for p in params if str(p.dtype) == dtype)
    parts["gradients"] = _bytes(p.grad for p in params)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's wraps the client one
    parts["optimizer state"] = _bytes(v for s in optimizer.state.values() for v in s.values()
                                      if torch.is_tensor(v) and v.dim())
    reference = getattr(objective, "reference", None)
    if reference is not None:
        parts["reference parameters"] = _bytes(reference.parameters())
    lengths = [len(x.input_ids) for e in examples for x in (e[1:] if row.media == "pairs" else (e,))]
    world.close()
    return {"peak_gib": (peak - before) / GIB, "seq_len": max(lengths), "losses": losses,
            "parts": {k: v / GIB for k, v in parts.items()}}


def planned(row: Row, seq_len: int, model_dir: str | None = None):
    """`plan_stage` for 1 process at the measured length, given the row's media kinds as `omni data
    stats` would report them."""
    from omni.plan import plan_stage
    from omni.train.engines import stage_layout

    cfg = stage_config(row, model_dir)
    kind = {"image": "image", "tiles": "image", "audio": "audio", "omni": "image+video+audio",
            "pairs": "text"}[row.media]
    names = list(cfg.data.datasets) or ["records"]
    with tempfile.TemporaryDirectory() as d:
        stats = Path(d) / "stats.json"
        stats.write_text(json.dumps({"datasets": [{"name": n, "tokens": {"total": {"max": seq_len}},
                                                   "modality_mix": {kind: 1.0}} for n in names]}))
        return plan_stage(cfg, 1, 80, stage_layout(cfg), stats=stats, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--tokens", type=int, default=256, help="words per sample (the tiny tokenizer: a token each)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", action="store_true", help="also print each row's plan table and measured parts")
    args = ap.parse_args()
    print(f"1 process, micro-batch 2 x ~{args.tokens} words, {args.steps} steps; LLM: {' '.join(WIDE)}")
    print(f"{'row':<28}{'seq':>6}{'planned GiB':>13}{'measured GiB':>14}{'planned/measured':>18}")
    env = {**os.environ, **MALLOC}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = None
        for name in args.rows:
            row = ROWS[name]
            if row.config.startswith(ALIGN) and model_dir is None:
                model_dir = str(Path(scratch) / "wide")
                save = f"import bench.plan_vs_measured as m; m.save_wide_model({model_dir!r})"
                subprocess.run([sys.executable, "-c", save], cwd=ROOT, check=True, env=env)
            folder = model_dir if row.config.startswith(ALIGN) else None
            call = f"measure(m.ROWS[{name!r}], {args.tokens}, {args.steps}, {args.threads}, {folder!r})"
            code = f"import json, bench.plan_vs_measured as m; print(json.dumps(m.{call}))"
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"row {name!r} failed:\n{out.stderr[-3000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            plan = planned(row, got["seq_len"], folder)
            print(f"{name:<28}{got['seq_len']:>6}{plan.total:>13.2f}{got['peak_gib']:>14.2f}"
                  f"{plan.total / got['peak_gib']:>17.2f}x", flush=True)
            if args.parts:
                print(plan.table())
                print("\n".join(f"  measured {k:<30}{v:>8.3f}" for k, v in got["parts"].items()), flush=True)


if __name__ == "__main__":
    main()

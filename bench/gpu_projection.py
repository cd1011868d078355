"""COMPUTED, not measured: what each 7B stage would cost on GPUs, from omni's own formulas.

Usage: python bench/gpu_projection.py [--gpus 8] [--gpu-gib 80] [--gpu H100] [--mfu 0.4] [--cpu-mfu X]
                                     [--stages STAGE ...] [--json]

For every stages/7b/*.yaml, on the model built on the meta device (no weights; Qwen2-7B's config.json
from the local Hugging Face cache, else its published copy bench/qwen2_7b_config.json):
- model FLOPs per LLM token (omni/train/flops.py: PaLM's formula, frozen parts forward only) of one
  packed micro-batch of the stage's longest sample kind (the one its `tokens_per_pack` is sized for,
  docs/decisions.md "Packing and the attention backend"), `micro_batch` samples of it;
- LLM tokens per GPU-hour at `--mfu` of the GPU's dense bf16 peak (and at `--cpu-mfu`, the MFU
  measured on CPU, when given), and the GPU-hours of the stage's `steps` on `--gpus` GPUs;
- `omni plan`'s memory per GPU for each engine layout on `--gpus` x `--gpu-gib`.
Replace these with measured figures from bench/gpu_acceptance.py once it has run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from omni.model.batch import MediaBatch
from omni.plan import plan_stage, stage_meta_model
from omni.train.config import load_stage
from omni.train.engines import LAYOUTS
from omni.train.flops import FlopCounter, peak_for_gpu
from omni.train.optim import set_trainable

ROOT = Path(__file__).resolve().parents[1]
QWEN2_7B = "Qwen/Qwen2-7B"
# each stage's longest sample kind: (images' AnyRes tiles, video frames, 30-s audio windows, text tokens)
LONGEST = {
    "1a_image_projector": (10, 0, 0, 228),
    "1b_image_vit": (10, 0, 0, 2276),
    "1c_image_all": (20, 0, 0, 456),
    "1d_video": (0, 48, 0, 480),
    "1e_audio": (0, 0, 4, 548),
    "1f_omni_alignment": (0, 48, 0, 480),
    "2_sft": (0, 48, 0, 480),
}


def qwen2_7b_override(folder: Path) -> list[str]:
    """Point llm.pretrained at Qwen2-7B's config: the local cache's when there, else the published copy."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(QWEN2_7B, local_files_only=True)
        return []
    except OSError:
        (folder / "config.json").write_text((ROOT / "bench/qwen2_7b_config.json").read_text())
        return [f"llm.pretrained={folder}"]


def micro_batch(model, samples: int, tiles: int, frames: int, windows: int, text: int) -> tuple[list[int], MediaBatch]:
    """One packed micro-batch of `samples` copies of a sample: LLM lengths and its media's shapes."""
    full_window = model.encoders["audio"].cfg.n_ctx
    length = (tiles * model.image_tokens() + model.video_tokens(frames)
              + windows * model.audio_window_tokens(full_window) + text)
    media = MediaBatch(
        image=torch.empty(samples * tiles, 0, device="meta") if tiles else None,
        image_tiles=[tiles] * samples if tiles else [],
        video=torch.empty(samples * frames, 0, device="meta") if frames else None,
        video_frames=[frames] * samples if frames else [],
        audio=torch.empty(samples * windows, 0, device="meta") if windows else None,
        audio_valid=[full_window] * (samples * windows))
    return [length] * samples, media


def project(args) -> list[dict]:
    rows = []
    peak = peak_for_gpu(args.gpu)
    if peak is None:
        raise SystemExit(f"--gpu {args.gpu!r}: not in omni/train/flops.py's PEAK_BF16_TFLOPS; name a listed GPU")
    with tempfile.TemporaryDirectory() as folder:
        override = qwen2_7b_override(Path(folder))
        for name in args.stages:
            sample = LONGEST[name]
            cfg = load_stage(ROOT / f"stages/7b/{name}.yaml")
            cfg.model_overrides += override
            cfg.init_from = None  # `previous` starts from the preset's architecture
            model = stage_meta_model(cfg)
            set_trainable(model, cfg.trainable)
            lengths, media = micro_batch(model, cfg.batch.micro_batch, *sample)
            per_token = FlopCounter(model)(lengths, media) / sum(lengths)
            step_tokens = sum(lengths) * cfg.batch.grad_accum * args.gpus
            row = {"stage": name, "engine": cfg.engine if cfg.engine != "deepspeed" else f"zero{cfg.zero_stage}",
                   "sample_tokens": lengths[0], "gflop_per_token": per_token / 1e9}
            for label, mfu in (("mfu", args.mfu), ("cpu_mfu", args.cpu_mfu)):
                if mfu:
                    per_hour = mfu * peak * 1e12 * 3600 / per_token
                    row[f"tokens_per_gpu_hour@{label}"] = per_hour
                    row[f"stage_gpu_hours@{label}"] = cfg.steps * step_tokens / per_hour
            row["plan_gib"] = {e: round(plan_stage(cfg, args.gpus, args.gpu_gib, engine=e).total, 1) for e in LAYOUTS}
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8, help="GPUs the stage runs on (default 8)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU for the plan (default 80)")
    p.add_argument("--gpu", default="H100", help="GPU whose dense bf16 peak to use (default H100: 989 TFLOP/s)")
    p.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation to project at (default 0.4)")
    p.add_argument("--cpu-mfu", type=float, default=None, help="also project at this MFU (e.g. the one measured on CPU)")
    p.add_argument("--stages", nargs="+", choices=list(LONGEST), default=list(LONGEST), metavar="STAGE",
                   help=f"stages/7b/STAGE.yaml to project (default: all of {', '.join(LONGEST)})")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1 or (args.cpu_mfu is not None and not 0 < args.cpu_mfu <= 1):
        p.error("--mfu and --cpu-mfu are fractions in (0, 1]")
    rows = project(args)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    mfus = [(label, v) for label, v in (("mfu", args.mfu), ("cpu_mfu", args.cpu_mfu)) if v]
    print(f"COMPUTED (not measured): {args.gpus} x {args.gpu} ({peak_for_gpu(args.gpu):g} bf16 TFLOP/s), "
          f"{args.gpu_gib:g} GiB each")
    head = ["stage", "engine", "sample tok", "GFLOP/tok"]
    for label, v in mfus:
        head += [f"Mtok/GPU-h @{v:.0%}", f"GPU-h @{v:.0%}"]
    head += [f"plan GiB {e}" for e in LAYOUTS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["stage"], r["engine"], str(r["sample_tokens"]), f"{r['gflop_per_token']:.1f}"]
        for label, _ in mfus:
            cells += [f"{r[f'tokens_per_gpu_hour@{label}'] / 1e6:.1f}", f"{r[f'stage_gpu_hours@{label}']:,.0f}"]
        cells += [f"{r['plan_gib'][e]:.1f}" for e in LAYOUTS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

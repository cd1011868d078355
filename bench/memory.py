"""Memory where 7B needs it: the LM head + loss (plain vs chunked) and frozen parts (fp32 vs bf16).

Usage: python bench/memory.py [--tokens 512 1024 2048] [--plain-max-tokens 2048] [--bf16]
(1) LM head + loss at Qwen2-7B's width (hidden 3584, vocabulary 152064): forward + backward of
    transformers' plain loss (full logits, fp32) and of omni's chunked one (omni/model/lm_loss.py),
    each in a fresh subprocess; the peak resident memory above what the process held before the
    loss (head weight, hidden states, labels) is reported, with both losses. The head is frozen
    (as the LLM is in stages 1a, 1b, 1d, 1e; the gradient still flows to the hidden states), so its weight
    gradient, the same 2 GiB for both, is left out. fp32 by default: a CPU without native bf16
    matmuls emulates them far slower; `--bf16` runs both under bf16 autocast (then the plain path
    also holds the bf16 logits next to their fp32 upcast). `--plain-max-tokens`: the plain path is
    not run above it (~1.7 GiB per 1k tokens in fp32: mind the machine's memory).
(2) Parameter memory of every 7B stage (stages/7b/*.yaml, the model on the meta device) with its
    frozen parameters held in fp32 and in bf16 (omni.model.generate.hold_frozen_in, what the ddp
    and fsdp2 engines do under `precision: bf16`).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def one_loss(variant: str, tokens: int, hidden: int, vocab: int, bf16: bool) -> dict:
    """Run in a fresh process: forward + backward of one LM loss; peak RSS above the set-up."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from omni.model.lm_loss import chunked_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    h = torch.randn(1, tokens, hidden).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    before = peak_rss()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if variant == "plain":
            loss = ForCausalLMLoss(head(h), labels, vocab, num_items_in_batch=tokens - 1)
        else:
            loss = chunked_lm_loss(h, head, labels, num_items=tokens - 1)
    loss.backward()
    return {"loss": float(loss.detach()), "peak_gib": (peak_rss() - before) / GIB}


def lm_head_rows(tokens: list[int], plain_max: int, hidden: int, vocab: int, bf16: bool) -> None:
    print(f"LM head + loss, hidden {hidden}, vocab {vocab}, {'bf16 autocast' if bf16 else 'fp32'}, frozen head; "
          "peak RSS above set-up (GiB)")
    print(f"{'tokens':>7}{'plain':>10}{'chunked':>10}{'ratio':>8}  losses (plain / chunked)")
    for n in tokens:
        got = {}
        for variant in ("plain", "chunked"):
            if variant == "plain" and n > plain_max:
                continue
            call = f"one_loss({variant!r}, {n}, {hidden}, {vocab}, {bf16})"
            code = f"import json, bench.memory as m; print(json.dumps(m.{call}))"
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
            got[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        plain, chunk = got.get("plain"), got["chunked"]
        p = f"{plain['peak_gib']:>10.2f}" if plain else f"{'not run':>10}"
        r = f"{plain['peak_gib'] / chunk['peak_gib']:>7.1f}x" if plain else f"{'':>8}"
        losses = f"{plain['loss']:.6f} / {chunk['loss']:.6f}" if plain else f"- / {chunk['loss']:.6f}"
        print(f"{n:>7}{p}{chunk['peak_gib']:>10.2f}{r}  {losses}")


def frozen_rows() -> None:
    from omni.model.generate import hold_frozen_in
    from omni.model.table import meta_model
    from omni.train.config import load_stage
    from omni.train.optim import set_trainable

    print("\n7B stages: parameter memory, frozen parameters in fp32 vs bf16 (GiB, whole model, before sharding)")
    print(f"{'stage':<24}{'engine':>8}{'frozen':>9}{'fp32':>8}{'bf16':>8}{'saved':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(ROOT / "bench/qwen2_7b_config.json", Path(tmp) / "config.json")
        for path in sorted((ROOT / "stages/7b").glob("[0-9]*.yaml")):
            cfg = load_stage(path, ["init_from=null"])
            model = meta_model(cfg.preset, [*cfg.model_overrides, f"llm.pretrained={tmp}"])
            set_trainable(model, cfg.trainable)
            size = lambda: sum(p.numel() * p.element_size() for p in model.parameters()) / GIB  # noqa: E731
            frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) / 1e9
            fp32 = size()
            hold_frozen_in(model, torch.bfloat16)
            bf16 = size()
            print(f"{path.stem:<24}{cfg.engine:>8}{frozen:>8.2f}B{fp32:>8.1f}{bf16:>8.1f}{fp32 - bf16:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--plain-max-tokens", type=int, default=2048)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=152064)
    args = ap.parse_args()
    lm_head_rows(args.tokens, args.plain_max_tokens, args.hidden, args.vocab, args.bf16)
    frozen_rows()


if __name__ == "__main__":
    main()

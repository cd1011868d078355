"""Golden losses: the per-step loss and gradient norm of short named tiny runs, compared with
stored files (tests/golden/*.json), the way torchtitan's integration tests guard refactors.

Runs: the whole tiny schedule (seven stages, 3 steps each, from a random-init model) on the
shared synthetic corpus, and tiny align `sft`, `dpo` and `rm` runs on the synthetic format world.
CPU fp32 with fixed seeds and two threads is deterministic, so on the machine class the files were
recorded with (torch version, ATen CPU capability and CPU vendor/family/model, stored beside the
numbers) the match is exact. On another CPU the matmul kernels sum in another order and the
comparison allows a relative 1e-4; re-record there only with a reason in the commit.

A behaviour change shows up here first. To record the files again (after a deliberate change, with
the reason in the commit message): `OMNI_UPDATE_GOLDEN=1 python -m pytest tests/integration/test_golden_losses.py`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from omni.align.synth import AlignSynthConfig, write_align_corpus
from omni.train.config import load_stage
from omni.schedule import run_schedule
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/golden"
UPDATE = os.environ.get("OMNI_UPDATE_GOLDEN") == "1"
OTHER_CPU_RTOL = 1e-4
COMMON = ["log.interval=1", "checkpoint.interval=0", "eval_interval=0", "seed=0"]


def _cpu_model() -> str:
    """Vendor, family and model from /proc/cpuinfo: two CPUs of one ATen capability (AVX512 on an
    Intel and on an AMD part) can still pick different matmul kernels, so the exact match needs both."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    return " ".join(fields.get(k, "?") for k in ("vendor_id", "cpu family", "model"))


def _machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": _cpu_model(), "threads": torch.get_num_threads()}


def _curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in rows]


def _check(name: str, curves: dict[str, list[dict]]) -> None:
    path = GOLDEN / f"{name}.json"
    if UPDATE:  # record, then compare with what was just written like any other run
        path.write_text(json.dumps({"machine": _machine(), "curves": curves}, indent=1) + "\n")
    golden = json.loads(path.read_text())
    same_machine = golden["machine"] == _machine()
    assert list(curves) == list(golden["curves"]), "the runs' stages differ from the golden file's"
    for stage, want in golden["curves"].items():
        got = curves[stage]
        assert [r["step"] for r in got] == [r["step"] for r in want], stage
        for g, w in zip(got, want):
            for key in ("loss", "grad_norm"):
                if same_machine:
                    assert g[key] == w[key], f"{name}/{stage} step {w['step']} {key}: {g[key]!r} != golden {w[key]!r}"
                else:
                    assert math.isclose(g[key], w[key], rel_tol=OTHER_CPU_RTOL), \
                        f"{name}/{stage} step {w['step']} {key}: {g[key]!r} vs golden {w[key]!r} (other CPU class)"


def test_tiny_schedule_losses_match_golden(tmp_path, tiny_corpus):
    run_schedule(ROOT / "stages/tiny/schedule.yaml", tmp_path,
                 [f"data.manifest={tiny_corpus}", "batch.micro_batch=4", "data.shuffle_buffer=20", "steps=3",
                  *COMMON], progress=False)
    names = [p.parent.name for p in sorted(tmp_path.glob("*/metrics.jsonl"))]
    order = ["stage1-image-projector", "stage1-image-vit", "stage1-image-all", "stage1-video",
             "stage1-audio", "stage1-omni-alignment", "stage2-sft"]
    assert sorted(names) == sorted(order)
    _check("tiny_schedule", {n: _curve(tmp_path / n) for n in order})


@pytest.fixture(scope="module")
def align_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden-align")
    write_align_corpus(AlignSynthConfig(out_dir=str(out), sft_train=64, pref_train=48, val=16, pas_train=8))
    return out


@pytest.mark.parametrize("method", ["sft", "dpo", "rm"])
def test_tiny_align_losses_match_golden(method, align_world, tmp_path):
    kind = "sft" if method == "sft" else "pref"
    cfg = load_stage(ROOT / f"omni/align/configs/tiny_{method}.yaml",
                     [f"init_from={align_world}/base", f"data.records={align_world}/{kind}_train.jsonl",
                      f"data.eval={align_world}/{kind}_val.jsonl", "steps=4", "batch.micro_batch=8", *COMMON])
    train_stage(cfg, tmp_path / method, progress=False)
    _check(f"tiny_{method}", {method: _curve(tmp_path / method)})


VARIANTS = {"packed": ["batch.tokens_per_pack=200"], "shard_partition": ["data.partition=shard", "data.workers=0"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_sft_variant_losses_match_golden(variant, tmp_path, tiny_corpus):
    """Packing and the shard-partitioned stream take their own code paths; each has its file."""
    extra = VARIANTS[variant]
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml",
                     [f"data.manifest={tiny_corpus}", "init_from=null", "batch.micro_batch=4",
                      "data.shuffle_buffer=20", "steps=3", *COMMON, *extra])
    train_stage(cfg, tmp_path / variant, progress=False)
    _check(f"tiny_sft_{variant}", {variant: _curve(tmp_path / variant)})

"""LoRA on every engine, and resumes with adapters. The reference: one ddp process (micro-batch 2 x
accumulation 2) training the adapters and the image projector for 2 steps over a trained tiny
model. Two fsdp2 processes and two DeepSpeed ZeRO-2 processes (torchrun, gloo; micro-batch 2)
train the same adapters; a ddp run stopped after its step-1 checkpoint resumes in place, and the
fsdp2 run's step-1 checkpoint (2 processes) resumes on one process (elastic), each from its
step-1 checkpoint alone, as a run stopped there leaves it. Every run trains on the reference's
samples step for step (samples.jsonl) to its losses (rel 1e-5) and ends in its merged `final/` and
peft adapter, up to float summation order (atol 1e-6 on one process, 1e-5 across two)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni.train.config import load_stage
from omni.train.trainer import train_stage
from tests.integration.test_lora import LORA

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "stages/tiny/2_sft.yaml"
COMMON = ("steps=2", "checkpoint.interval=1", "log.interval=1", "log.samples=true", "data.shuffle_buffer=20",
          "optim.lr=3e-3", *LORA)
SPLIT = {1: ("batch.micro_batch=2", "batch.grad_accum=2"), 2: ("batch.micro_batch=2",)}  # one global batch of 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_ports = iter(range(37500 + os.getpid() % 300 * 10, 65000))


def _train(out: Path, manifest, base, engine: str, nproc: int, *extra) -> Path:
    args = [f"data.manifest={manifest}", f"init_from={base}", f"engine={engine}", *COMMON, *SPLIT[nproc], *extra]
    if nproc == 1:
        return train_stage(load_stage(STAGE, args), out, progress=False)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(next(_ports)), "-m", "omni.cli", "-q", "train", str(STAGE),
                           "--out", str(out), *args], check=False, capture_output=True, text=True, env=ENV,
                          timeout=1800)  # a hang guard: DeepSpeed builds its CPU ops on a first use
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "final"


def _rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def _same_final(a: Path, b: Path, atol: float) -> None:
    """`a`'s run trained on `b`'s samples, step for step, to `b`'s losses, merged model and adapter."""
    assert [r["samples"] for r in _rows(a.parent, "samples.jsonl")] == \
        [r["samples"] for r in _rows(b.parent, "samples.jsonl")]
    losses = [r["loss"] for r in _rows(a.parent, "metrics.jsonl")]
    assert len(losses) == 2 and losses == pytest.approx([r["loss"] for r in _rows(b.parent, "metrics.jsonl")],
                                                        rel=1e-5, abs=0)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol, msg=f"{name}: {k}")


def _stopped_copy(src: Path, dst: Path) -> None:
    """`src` as it was when stopped right after its step-1 checkpoint (it had logged step 2)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", "step-00000002"))


@pytest.fixture(scope="module")
def reference(tiny_corpus, trained_tiny, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lora-ddp") / "run", tiny_corpus, trained_tiny, "ddp", 1)


def test_a_stopped_lora_run_resumes_to_the_same_adapter(reference, tiny_corpus, trained_tiny, tmp_path):
    _stopped_copy(reference.parent, tmp_path / "run")
    assert (tmp_path / "run/checkpoints/step-00000001").is_dir() and not (tmp_path / "run/final").exists()
    _same_final(_train(tmp_path / "run", tiny_corpus, trained_tiny, "ddp", 1), reference, atol=1e-6)


def test_fsdp2_trains_lora_on_two_processes_and_resumes_on_one(reference, tiny_corpus, trained_tiny, tmp_path):
    two = _train(tmp_path / "two", tiny_corpus, trained_tiny, "fsdp2", 2)
    _same_final(two, reference, atol=1e-5)
    _stopped_copy(two.parent, tmp_path / "one")
    _same_final(_train(tmp_path / "one", tiny_corpus, trained_tiny, "fsdp2", 1), reference, atol=1e-5)


def test_deepspeed_zero2_trains_lora_on_two_processes(reference, tiny_corpus, trained_tiny, tmp_path):
    _same_final(_train(tmp_path / "ds", tiny_corpus, trained_tiny, "deepspeed", 2, "zero_stage=2"),
                reference, atol=1e-5)

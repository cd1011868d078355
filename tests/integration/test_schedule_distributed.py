"""`omni schedule` under torchrun: one process group for the whole schedule, every rank trains every
stage, rank 0 alone writes the shared final/ folder; two stages (the second `init_from: previous`)
on 2 gloo processes x micro-batch 2 equal one process x micro-batch 4, on ddp and fsdp2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("stage1-image-projector", "stage2-sft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_ports = iter(range(31500 + os.getpid() % 300 * 10, 65000))


def _schedule(tmp_path: Path, out: Path, manifest, nproc: int, engine: str) -> None:
    sched = tmp_path / "two.yaml"
    sched.write_text(f"name: two\nstages:\n- {ROOT}/stages/tiny/1a_image_projector.yaml\n- {ROOT}/stages/tiny/2_sft.yaml\n")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(next(_ports))] if nproc > 1 else [sys.executable])
    done = subprocess.run(launcher + ["-m", "omni.cli", "-q", "schedule", str(sched), "--out", str(out),
                                      f"data.manifest={manifest}", "steps=3", f"batch.micro_batch={4 // nproc}",
                                      "log.interval=1", "data.shuffle_buffer=20", f"engine={engine}"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for s in STAGES for x in (run / s / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedule-single")
    _schedule(tmp, tmp / "run", tiny_corpus, 1, "ddp")
    return tmp / "run"


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_schedule_on_two_processes_equals_one(engine, single, tiny_corpus, tmp_path):
    _schedule(tmp_path, tmp_path / "run", tiny_corpus, 2, engine)
    torch.testing.assert_close(_losses(tmp_path / "run"), _losses(single), rtol=1e-5, atol=0)
    a, b = load_file(tmp_path / "run/final/model.safetensors"), load_file(single / "final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no torn temp folders

"""Elastic resume: a ddp or fsdp2 run checkpointed on N processes resumes on M != N (real torchrun
processes on gloo) and continues the run it resumes. A 1-process run checkpointed every step
resumes on 2 from step 1; that run's own step-2 checkpoint (written by 2 processes) resumes on 1.
The global batch stays (1 process x micro-batch 2 x accumulation 2 = 2 processes x micro-batch 2),
so every step trains on the same samples: samples.jsonl, every step's raw samples with their
position in the shared stream, shows none twice and none left out, step for step the
uninterrupted run's. The weights and the optimizer state reshard: the losses after the resume and
the final weights match the uninterrupted run's up to float summation order (1 process sums a
step's two micro-batches, 2 sum theirs across ranks): rel 1e-5 for the loss, atol 1e-5 for the
weights (measured: 1e-7 and 6e-7), where a resume that lost the optimizer state is off by 4e-3.
Another global batch is refused, naming the batch.grad_accum that keeps it."""
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

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "stages/tiny/2_sft.yaml"
COMMON = ("init_from=null", "steps=4", "checkpoint.interval=1", "checkpoint.keep=3", "log.interval=1",
          "log.samples=true", "data.shuffle_buffer=20", "optim.lr=3e-3")
SPLIT = {1: ("batch.micro_batch=2", "batch.grad_accum=2"), 2: ("batch.micro_batch=2",)}  # one global batch of 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_ports = iter(range(33500 + os.getpid() % 300 * 10, 65000))


def _train(out: Path, manifest, engine: str, nproc: int) -> None:
    """One process in this one (no launcher to start), two under torchrun."""
    args = [f"data.manifest={manifest}", f"engine={engine}", *COMMON, *SPLIT[nproc]]
    if nproc == 1:
        train_stage(load_stage(STAGE, args), out, progress=False)
        return
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(next(_ports)), "-m", "omni.cli", "-q", "train", str(STAGE),
                           "--out", str(out), *args], check=False, capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def _samples(run: Path) -> list[list[list]]:
    rows = _rows(run, "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the rows a stopped run wrote past its checkpoint are gone
    return [r["samples"] for r in rows]


def _stopped_copy(src: Path, dst: Path, after: int) -> None:
    """`src` as it was when stopped right after its step-`after` checkpoint (it had logged later steps)."""
    later = [f"step-{s:08d}" for s in range(after + 1, 5)]
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", *later))


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_checkpoint_resumes_on_another_number_of_processes(engine, tiny_corpus, tmp_path):
    straight = tmp_path / "straight"  # 1 process, a checkpoint every step
    _train(straight, tiny_corpus, engine, 1)
    expected = _rows(straight, "metrics.jsonl")
    # 1 -> 2 from step 1; that run's own step-2 checkpoint (2 processes) -> 1
    for source, run, after, n, m in ((straight, tmp_path / "1-to-2", 1, 1, 2),
                                     (tmp_path / "1-to-2", tmp_path / "2-to-1", 2, 2, 1)):
        _stopped_copy(source, run, after)
        state = torch.load(run / f"checkpoints/step-{after:08d}/trainer_state.pt", weights_only=True)
        assert (state["step"], state["world_size"]) == (after, n)
        _train(run, tiny_corpus, engine, m)

        steps = _samples(run)
        assert steps == _samples(straight)  # step for step the same samples: positions, keys and shards
        positions = [p for step in steps for p, _ in step]
        assert positions == list(range(4 * 4))  # every sample of the stream once, none left out
        rows = _rows(run, "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert [r["samples"] for r in rows] == [4, 8, 12, 16]  # counted once over the ranks after the resume
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=0)
        a, b = load_file(run / "final/model.safetensors"), load_file(straight / "final/model.safetensors")
        assert a.keys() == b.keys()
        for k in a:  # updated with the resharded optimizer state after the resume
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_another_global_batch_is_refused_with_the_value_that_keeps_it(tiny_corpus):
    from omni.config import ConfigError, to_dict
    from omni.train.trainer import _check_resume_config

    def config(*batch):
        return to_dict(load_stage(STAGE, [f"data.manifest={tiny_corpus}", *COMMON, *batch]))

    written = config("batch.micro_batch=4")  # on 8 processes: a global batch of 32
    for batch, processes in ((("batch.micro_batch=4", "batch.grad_accum=2"), 4), (("batch.micro_batch=8",), 4),
                             (("batch.micro_batch=2", "batch.grad_accum=16"), 1)):
        _check_resume_config(written, config(*batch), Path("ckpt"), False, (8, processes))  # the same 32
    with pytest.raises(ConfigError, match=r"8 x 4 x 1 = 32 -> 4 x 4 x 1 = 16\); .*"
                                          r"on 4 process\(es\) batch\.grad_accum=2 keeps the global batch"):
        _check_resume_config(written, written, Path("ckpt"), False, (8, 4))

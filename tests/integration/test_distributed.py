"""Data parallelism and accumulation train exactly like one big batch.

Real torchrun with the gloo backend: 2 processes x micro-batch 2 must give the loss curve of
1 process x micro-batch 4, and of 1 process x micro-batch 2 x accumulation 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path, manifest, *extra, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "omni.cli", "-q", "train", str(ROOT / "stages/tiny/2_sft.yaml"), "--out", str(out),
                      f"data.manifest={manifest}", "init_from=null", f"steps={STEPS}", "log.interval=1",
                      "data.shuffle_buffer=20", "optim.lr=3e-3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one_big_batch(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _train(out, tiny_corpus, "batch.micro_batch=4")
    return _losses(out)


def test_accumulation_equals_one_big_batch(one_big_batch, tiny_corpus, tmp_path):
    _train(tmp_path, tiny_corpus, "batch.micro_batch=2", "batch.grad_accum=2")
    assert _losses(tmp_path) == pytest.approx(one_big_batch, rel=1e-5, abs=1e-6)


def test_two_processes_equal_one_big_batch(one_big_batch, tiny_corpus, tmp_path):
    _train(tmp_path, tiny_corpus, "batch.micro_batch=2", nproc=2)
    losses = _losses(tmp_path)
    assert len(losses) == STEPS
    assert losses == pytest.approx(one_big_batch, rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0]


def test_a_killed_two_process_run_resumes_step_for_step(tiny_corpus, tmp_path):
    import signal
    import time

    args = ("batch.micro_batch=2", "steps=24", "checkpoint.interval=4", "checkpoint.keep=2")
    straight = tmp_path / "straight"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = lambda out, port: base + ["--master_port", str(port), "-m", "omni.cli", "-q", "train",  # noqa: E731
                                    str(ROOT / "stages/tiny/2_sft.yaml"), "--out", str(out),
                                    f"data.manifest={tiny_corpus}", "init_from=null", "log.interval=1",
                                    "data.shuffle_buffer=20", "optim.lr=3e-3", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = 29600 + os.getpid() % 300
    subprocess.run(cmd(straight, port), env=env, check=True, capture_output=True, timeout=600)
    expected = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed, port + 1), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints/step-00000008/trainer_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    subprocess.run(cmd(killed, port + 2), env=env, check=True, capture_output=True, timeout=600)
    resumed = {}
    for line in (killed / "metrics.jsonl").read_text().splitlines():  # later rows win: the resumed run's
        row = json.loads(line)
        resumed[row["step"]] = row["loss"]
    assert sorted(resumed) == sorted(expected)
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([expected[s] for s in sorted(expected)],
                                                                   rel=1e-6, abs=1e-7)

"""A run on `data.records` killed with SIGKILL resumes by seeking to its checkpoint's data position
(omni/data/stream.py `_epochs`), with micro-batches made ahead by the feeder thread (data.prefetch,
which has taken items past the checkpoint when the kill comes). samples.jsonl, each step's records
with their position in the seeded epochs and their file:line, is step for step the uninterrupted
run's: no record trained twice, none left out, across an epoch boundary. (That the seek reads no
record before the position: tests/unit/test_prefetch.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omni.align.synth import AlignSynthConfig, write_align_corpus

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "omni/align/configs/tiny_sft.yaml"
RECORDS, MICRO, STEPS, KILL_AFTER = 24, 4, 24, 8  # 4 epochs of 24 records; the kill lands inside epoch 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _command(out: Path, world: Path) -> list[str]:
    return [sys.executable, "-m", "omni.cli", "-q", "train", str(STAGE), "--out", str(out),
            f"init_from={world}/base", f"data.records={world}/sft_train.jsonl", "data.eval=null",
            f"steps={STEPS}", f"batch.micro_batch={MICRO}", "checkpoint.interval=4", "log.interval=1",
            "log.samples=true", "eval_interval=0", "data.prefetch=2"]


def _samples(run: Path) -> list[list[list]]:
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rows logged past the checkpoint are gone
    return [r["samples"] for r in rows]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def test_a_killed_records_run_resumes_by_seek_with_no_record_replayed_or_skipped(tmp_path):
    world = write_align_corpus(AlignSynthConfig(out_dir=str(tmp_path / "world"), sft_train=RECORDS, pref_train=4,
                                                val=4, pas_train=4))
    straight = tmp_path / "straight"
    done = subprocess.run(_command(straight, world), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed, world), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (killed / f"checkpoints/step-{KILL_AFTER:08d}/trainer_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    done = subprocess.run(_command(killed, world), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    steps = _samples(killed)
    assert steps == _samples(straight)  # step for step the same records: positions and file:line
    positions = [p for step in steps for p, _ in step]
    assert positions == list(range(STEPS * MICRO))  # each position of the seeded epochs once, in order
    wheres = [w for step in steps for _, w in step]
    for epoch in range(STEPS * MICRO // RECORDS):  # every whole epoch is every record once
        assert len(set(wheres[epoch * RECORDS:(epoch + 1) * RECORDS])) == RECORDS
    assert _losses(killed) == pytest.approx(_losses(straight), rel=1e-6, abs=1e-7)

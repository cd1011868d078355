"""Held-out scoring during training is split over the ranks and gives the 1-process numbers.

Real torchrun with gloo: 2 processes x micro-batch 2 train like 1 process x micro-batch 4
(tests/integration/test_distributed.py), so their held-out results before and after training must
agree; each rank scores only its half of the records.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni.align.objectives.base import merge_shares

ROOT = Path(__file__).resolve().parents[2]
EVAL_RECORDS = 10


def _run(out: Path, manifest, micro_batch: int, nproc: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(29400 + os.getpid() % 500)] if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "omni.cli", "-q", "train", str(ROOT / "stages/tiny/2_sft.yaml"), "--out", str(out),
                      f"data.manifest={manifest}", "init_from=null", "steps=2", f"batch.micro_batch={micro_batch}",
                      "data.shuffle_buffer=20", "optim.lr=3e-3", f"data.eval={manifest}",
                      f"data.eval_limit={EVAL_RECORDS}", "checkpoint.interval=0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_score_half_each_and_match_one_process(tiny_corpus, tmp_path):
    _run(tmp_path / "one", tiny_corpus, micro_batch=4, nproc=1)
    two = _run(tmp_path / "two", tiny_corpus, micro_batch=2, nproc=2)
    for rank in (0, 1):
        assert f"rank {rank} scores {EVAL_RECORDS // 2} of {EVAL_RECORDS} records" in two.stderr
    one_eval = json.loads((tmp_path / "one/eval.json").read_text())
    two_eval = json.loads((tmp_path / "two/eval.json").read_text())
    for when in ("before", "after"):
        assert two_eval[when]["tokens"] == one_eval[when]["tokens"] > 0
        for key in ("loss", "token_accuracy"):
            assert two_eval[when][key] == pytest.approx(one_eval[when][key], rel=1e-5), (when, key)


def test_merge_weighs_each_share_by_its_count():
    parts = [{"loss": 1.0, "token_accuracy": 0.5, "tokens": 30}, {}, {"loss": 3.0, "token_accuracy": 1.0, "tokens": 10}]
    assert merge_shares(parts) == {"loss": 1.5, "token_accuracy": 0.625, "tokens": 40}

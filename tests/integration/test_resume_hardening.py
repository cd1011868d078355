"""A resume continues the run it resumes, or says why it cannot: the bad-sample budget means the same
after a resume over shards with read errors (and metrics.jsonl gets no duplicate rows and no reset
`skipped`), and a config that changed since the checkpoint is refused unless the user says
--resume-with-changes (changes to logging or checkpointing are fine)."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from omni.config import ConfigError
from omni.train.config import load_stage
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]


def _truncated_mix(tmp_path: Path, tiny_corpus) -> Path:
    """text_arith from two shards: a good one and a copy cut off mid-member (a read error per draw)."""
    man = yaml.safe_load(Path(tiny_corpus).read_text())
    entry = next(d for d in man["datasets"] if d["name"] == "text_arith" and d["split"] == "train")
    src = sorted((Path(tiny_corpus).parent).glob(entry["urls"].split("{")[0] + "*"))[0]
    shutil.copy(src, tmp_path / "arith-000000.tar")
    data = src.read_bytes()
    (tmp_path / "arith-000001.tar").write_bytes(data[: len(data) * 2 // 3 + 100])
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"name": "cut", "datasets": [
        {"name": "text_arith", "urls": "arith-{000000..000001}.tar", "num_samples": 48}]}))
    return path


def _cfg(manifest, *extra):
    return load_stage(ROOT / "stages/tiny/2_sft.yaml",
                      [f"data.manifest={manifest}", "init_from=null", "data.datasets={}", "steps=10",
                       "batch.micro_batch=32", "data.shuffle_buffer=20", "log.interval=1", "data.max_bad_fraction=0.1",
                       "checkpoint.interval=6", "optim.lr=3e-4", *extra])


def test_resume_over_shards_with_read_errors_keeps_the_budget_and_the_metrics(tmp_path, tiny_corpus):
    manifest = _truncated_mix(tmp_path, tiny_corpus)
    straight = train_stage(_cfg(manifest), tmp_path / "a", progress=False)
    rows_a = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert rows_a[-1]["skipped"] > 0  # the cut shard was met
    # run b is killed after its step-6 checkpoint, having logged steps 7 and 8: what is left on disk
    train_stage(_cfg(manifest), tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b/final")
    lines = (tmp_path / "b/metrics.jsonl").read_text().splitlines()
    (tmp_path / "b/metrics.jsonl").write_text("\n".join(lines[:8]) + "\n")
    resumed = train_stage(_cfg(manifest), tmp_path / "b", progress=False)
    rows_b = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 11))
    keys = ("loss", "grad_norm", "samples", "skipped")
    assert [{k: r[k] for k in keys} for r in rows_b] == [{k: r[k] for k in keys} for r in rows_a]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_config_is_refused_on_resume_unless_asked(tmp_path, tiny_corpus, caplog):
    train_stage(_cfg(tiny_corpus, "data.datasets={text_arith: 1.0}"), tmp_path / "run", progress=False)
    shutil.rmtree(tmp_path / "run/final")
    with pytest.raises(ConfigError, match=r"optim.lr: 0.0003 -> 0.001.*--resume-with-changes"):
        train_stage(_cfg(tiny_corpus, "data.datasets={text_arith: 1.0}", "optim.lr=1e-3"), tmp_path / "run",
                    progress=False)
    done = subprocess.run([sys.executable, "-m", "omni.cli", "-q", "train", str(ROOT / "stages/tiny/2_sft.yaml"),
                           "--out", str(tmp_path / "run"), f"data.manifest={tiny_corpus}", "init_from=null", "steps=10",
                           "batch.micro_batch=32", "data.shuffle_buffer=20", "data.datasets={text_arith: 1.0}",
                           "log.interval=1", "data.max_bad_fraction=0.1", "checkpoint.interval=6", "optim.lr=3e-4",
                           "seed=1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "seed: 0 -> 1" in done.stderr and "Traceback" not in done.stderr
    # logging and checkpointing may change; with the flag, so may the rest, and it is logged
    with caplog.at_level(logging.WARNING):
        train_stage(_cfg(tiny_corpus, "data.datasets={text_arith: 1.0}", "optim.lr=1e-3", "log.interval=5",
                         "checkpoint.keep=1"), tmp_path / "run", progress=False, resume_with_changes=True)
    assert any("changed config" in r.getMessage() and "optim.lr" in r.getMessage() for r in caplog.records)
    assert not any("log.interval" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run/final/model.safetensors").is_file()

"""Tiny real runs of the whole pipeline: stage training, exact resume, schedule, eval, CLI."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from omni import tiny_world as world
from omni.eval import evaluate
from omni.train.config import load_stage
from omni.schedule import run_schedule
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["batch.micro_batch=4", "log.interval=1", "data.shuffle_buffer=20"]


def _stage(name, manifest, *extra):
    return load_stage(ROOT / "stages/tiny" / name, [f"data.manifest={manifest}", *SMALL, *extra])


def test_stage_trains_logs_and_writes_a_loadable_model(tmp_path, tiny_corpus):
    cfg = _stage("1f_omni_alignment.yaml", tiny_corpus, "init_from=null", "steps=4")
    final = train_stage(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["samples"] == 4 * r["step"] for r in rows)
    assert (final / "model.safetensors").is_file() and (final / "tokenizer").is_dir()
    assert not list((tmp_path / "run").glob(".final.tmp-*"))  # atomic write leaves no temp dirs


def test_resume_from_a_mid_run_checkpoint_is_exact(tmp_path, tiny_corpus, caplog):
    args = ("init_from=null", "steps=6", "checkpoint.interval=3", "checkpoint.keep=1")
    straight = train_stage(_stage("1f_omni_alignment.yaml", tiny_corpus, *args), tmp_path / "a", progress=False)
    # run b: same config; then throw away its end state and resume from its step-3 checkpoint
    train_stage(_stage("1f_omni_alignment.yaml", tiny_corpus, *args), tmp_path / "b", progress=False)
    assert [p.name for p in (tmp_path / "b/checkpoints").iterdir()] == ["step-00000003"]
    state = torch.load(tmp_path / "b/checkpoints/step-00000003/trainer_state.pt", weights_only=True)
    assert state["samples"][0]["reader"]["read"] == 3 * 4  # the data pipeline's state: the resume seeks
    shutil.rmtree(tmp_path / "b/final")
    with caplog.at_level(logging.INFO):
        resumed = train_stage(_stage("1f_omni_alignment.yaml", tiny_corpus, *args), tmp_path / "b", progress=False)
    assert "resumed" in caplog.text and "replaying" not in caplog.text
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_schedule_runs_every_stage_and_freezes_what_each_stage_says(tmp_path, tiny_corpus):
    final = run_schedule(ROOT / "stages/tiny/schedule.yaml", tmp_path,
                         [f"data.manifest={tiny_corpus}", *SMALL, "steps=2"], progress=False)
    assert (final / "model.safetensors").is_file()
    names = ["stage1-image-projector", "stage1-image-vit", "stage1-image-all", "stage1-video",
             "stage1-audio", "stage1-omni-alignment", "stage2-sft"]
    assert all((tmp_path / n / "final").is_dir() for n in names)
    before = load_file(tmp_path / "stage1-image-all/final/model.safetensors")
    after = load_file(tmp_path / "stage1-video/final/model.safetensors")  # trains projectors.video only
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projectors.video.") for k in changed)
    # a rerun skips finished stages and leaves the result alone
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    run_schedule(ROOT / "stages/tiny/schedule.yaml", tmp_path, [f"data.manifest={tiny_corpus}", *SMALL, "steps=2"],
                 progress=False)
    assert load_file(final / "model.safetensors").keys() == after.keys()
    assert (tmp_path / "stage2-sft/final/model.safetensors").stat().st_mtime_ns <= mtime


def test_eval_reports_every_modality_with_controls(tmp_path, tiny_corpus):
    cfg = _stage("2_sft.yaml", tiny_corpus, "init_from=null", "steps=2")
    final = train_stage(cfg, tmp_path / "run", progress=False)
    qa = ["image_colour", "video_colour_change", "audio_note", "image_audio_side", "text_arith"]
    results = evaluate(final, tiny_corpus, datasets=qa, limit=4, progress=False)
    assert list(results) == ["image", "video", "audio", "image+audio", "text"]
    assert [row["task"] for row in results.values()] == qa
    for row in results.values():  # that a trained model beats these columns: tests/integration/test_learning.py
        assert row["n"] == 4 and row["skipped"] == 0
        # chance is one over the answers the evaluated samples hold: a subset of the task's answer set
        assert world.CHANCE[row["task"]] <= row["chance"] and (1 / row["chance"]).is_integer()
        assert (row["accuracy"] * 4).is_integer() and (row["blanked_accuracy"] * 4).is_integer()


def test_cli_help_and_clear_config_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omni.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "schedule" in out.stdout and "synth" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "omni.cli", "train", str(ROOT / "stages/tiny/2_sft.yaml"),
                          "--out", str(tmp_path), "optim.lrr=1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "optim" in bad.stderr and "lrr" in bad.stderr


def test_packed_stage_trains_padding_free_and_warns_over_its_budget(tmp_path, tiny_corpus, caplog):
    cfg = _stage("2_sft.yaml", tiny_corpus, "init_from=null", "steps=2", "batch.tokens_per_pack=200")
    with caplog.at_level("WARNING", logger="omni.train.trainer"):
        train_stage(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["fill"] == 1.0 and r["loss"] > 0 for r in rows)  # one row, no padding
    # 32 samples never fit 200 tokens: said once, with what to change
    over = [r.getMessage() for r in caplog.records if "exceeds batch.tokens_per_pack=200" in r.getMessage()]
    assert len(over) == 1 and "raise tokens_per_pack or lower batch.micro_batch" in over[0]

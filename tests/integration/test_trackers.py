"""`log.trackers`: every metrics.jsonl and eval.jsonl scalar reaches TensorBoard and W&B (offline, no
account), from rank 0 only, with the stage config as the run config: read back with each library's
own reader (TensorBoard's EventAccumulator, W&B's `wandb leet inspect`). Unknown trackers and
missing packages are one-line ConfigErrors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omni.config import ConfigError
from omni.train.config import load_stage

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "stages/tiny/2_sft.yaml"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _expected(rows: list[dict], group: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every number in the JSONL rows (the step is the x axis)."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                out.setdefault(f"{group}/{key}", {})[row["step"]] = float(value)
    return out


@pytest.fixture(scope="module")
def tracked_run(tiny_corpus, tmp_path_factory):
    """Two ranks train 2 steps with both trackers, throughput metrics and held-out scoring at every step."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    home = out.parent / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_CONFIG_DIR=str(home), WANDB_CACHE_DIR=str(home), WANDB_SILENT="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29000 + os.getpid() % 500), "-m", "omni.cli", "-q", "train", str(STAGE),
           "--out", str(out), f"data.manifest={tiny_corpus}", "init_from=null", "steps=2", "batch.micro_batch=2",
           "data.shuffle_buffer=20", f"data.eval={tiny_corpus}", "data.eval_limit=4", "eval_interval=1",
           "log.interval=1", "log.profile=true", "log.peak_tflops=1.0", "log.trackers=[tensorboard, wandb]"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, env


def test_tensorboard_holds_every_metric_and_held_out_scalar_from_rank_0_only(tracked_run):
    out, _ = tracked_run
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one writer: rank 0's
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    metrics, evals = _rows(out / "metrics.jsonl"), _rows(out / "eval.jsonl")
    assert [r["step"] for r in metrics] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]
    expected = {**_expected(metrics, "train"), **_expected(evals, "eval")}
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/skipped",
                "eval/loss", "eval/token_accuracy"):
        assert tag in expected, tag
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag  # event files hold float32
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config.strip("`\njson")) == json.loads((out / "stage.json").read_text())


def test_wandb_offline_run_holds_every_scalar_and_the_stage_config(tracked_run):
    out, env = tracked_run
    runs = list((out / "wandb").glob("*run-*"))
    assert len(runs) == 1 and runs[0].name.startswith("offline-run-"), runs  # rank 0's, offline
    read = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(runs[0])],
                          capture_output=True, text=True, timeout=120, env=env)
    assert read.returncode == 0, read.stderr[-2000:]
    records = [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
    got: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec["type"] == "history":
            step = int(rec["history"]["step"]["num"])
            for key, value in rec["history"]["item"].items():
                if not key.startswith("_"):
                    got.setdefault(key, {})[step] = value
    metrics, evals = _rows(out / "metrics.jsonl"), _rows(out / "eval.jsonl")
    assert got == {**_expected(metrics, "train"), **_expected(evals, "eval")}
    run = next(rec["run"] for rec in records if rec["type"] == "run")
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert run["display_name"] == "stage2-sft" and config == json.loads((out / "stage.json").read_text())


def test_unknown_tracker_is_a_config_error_listing_the_known_ones():
    known = r"choose from \['tensorboard', 'wandb'\]"
    with pytest.raises(ConfigError, match=r"log.trackers: 'mlflow' is not a tracker; " + known):
        load_stage(STAGE, ["log.trackers=[tensorboard, mlflow]"])


# `python -c`: the package made unimportable the way Python marks a module that cannot be imported
# (sys.modules[name] = None), then `omni train` as the console runs it
WITHOUT = "import runpy, sys; sys.modules[sys.argv.pop(1)] = None; runpy.run_module('omni.cli', run_name='__main__')"


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_tracker_package_stops_train_in_one_line_naming_the_extra(package, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", WITHOUT, package, "train", str(STAGE), "--out", str(out),
                           "log.trackers=[tensorboard, wandb]"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"config error: {STAGE}: log.trackers: {package} needs the {package} package; install the track extra: "
        "pip install -e .[track]"]
    assert not out.exists()  # refused when the config loads, before any training


def test_a_resumed_run_hides_the_tensorboard_events_written_after_its_checkpoint(tmp_path):
    """A killed run logged steps 1-3 but checkpointed at 1: the resumed run's rows replace steps 2-3."""
    from omni.train.trackers import Trackers

    first = Trackers(["tensorboard"], tmp_path, "s", {"steps": 3})
    for step in (1, 2, 3):
        first.log(step, "train", {"step": step, "loss": float(step)})
    first.close()
    resumed = Trackers(["tensorboard"], tmp_path, "s", {"steps": 3}, start_step=2)
    for step in (2, 3):
        resumed.log(step, "train", {"step": step, "loss": 10.0 * step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_an_online_wandb_run_without_an_account_is_one_line_saying_how_to_log_offline(tmp_path, monkeypatch):
    from omni.train.trackers import Trackers

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match=r"log.trackers: wandb could not start a run \(.*API key.*\); unset "
                                          r"WANDB_MODE and WANDB_API_KEY to log offline"):
        Trackers(["wandb"], tmp_path, "s", {})

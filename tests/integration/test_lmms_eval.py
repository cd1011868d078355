"""`lmms-eval --model omni` (the real lmms-eval, in its own environment: `make eval-env`) scores a
local task written from held-out synthetic samples (`omni data lmms-task`) exactly as `omni eval`
scores the same items, for a stage's model folder and for its export; image, video, audio and
image+audio items go through lmms-eval's chat messages to omni's processor."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni.eval import evaluate
from omni.integrations.lmms_task import write_tasks

ROOT = Path(__file__).resolve().parents[2]
LMMS_EVAL = ROOT / ".venv-eval" / "bin" / "lmms-eval"
DATASETS = ["image_colour", "video_colour_change", "audio_note", "image_audio_side", "text_arith"]
LIMIT = 4


@pytest.fixture(scope="module")
def tasks(tiny_corpus, tmp_path_factory):
    return write_tasks(tiny_corpus, tmp_path_factory.mktemp("lmms-tasks"), datasets=DATASETS, limit=LIMIT)


@pytest.fixture(scope="module")
def exported(trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms-export") / "export"
    done = subprocess.run([sys.executable, "-m", "omni.cli", "-q", "export", "--ckpt", str(trained_tiny),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def lmms_eval_accuracy(model_dir: Path, tasks, out: Path) -> dict[str, tuple[float, int]]:
    """task -> (accuracy, items) of one `lmms-eval --model omni` run, read from its results file."""
    if not LMMS_EVAL.exists():
        pytest.fail(f"{LMMS_EVAL} is missing: run `make eval-env` (make test does) to set up lmms-eval's environment")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([str(LMMS_EVAL), "--model", "omni", "--model_args", f"pretrained={model_dir},device=cpu",
                           "--tasks", ",".join(tasks.tasks), "--include_path", str(tasks.folder),
                           "--batch_size", "1", "--output_path", str(out / "results")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    [results_file] = (out / "results").rglob("*_results.json")
    report = json.loads(results_file.read_text())
    return {task: (report["results"][task]["accuracy,none"], report["n-samples"][task]["effective"])
            for task in tasks.tasks}


@pytest.mark.parametrize("which", ["stage folder", "export"])
def test_lmms_eval_scores_what_omni_eval_scores(which, request, trained_tiny, tiny_corpus, tasks, tmp_path):
    model = trained_tiny if which == "stage folder" else request.getfixturevalue("exported")
    ours = evaluate(model, tiny_corpus, datasets=DATASETS, limit=LIMIT, progress=False)
    expected = {f"omni_{row['task']}": (row["accuracy"], row["n"]) for row in ours.values()}
    assert sorted(expected) == sorted(tasks.tasks) and all(n == LIMIT for _, n in expected.values())
    assert lmms_eval_accuracy(model, tasks, tmp_path) == expected
    assert sum(acc for acc, _ in expected.values()) > 0  # the model answers some items: equal is not 0 == 0

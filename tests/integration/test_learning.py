"""The model learns to read its media: a tiny model trained on the image-colour and arithmetic tasks
beats chance and its blanked-media control on held-out samples, and `omni eval --min-gain` (what
`make quickstart` runs) passes for it and fails, naming the task, for the same model untrained."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omni.train.config import load_stage
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["image_colour", "text_arith"]


def _train(out: Path, manifest: str, steps: int, lr: str) -> Path:
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml",
                     [f"data.manifest={manifest}", "init_from=null", f"steps={steps}", f"optim.lr={lr}",
                      "batch.micro_batch=16", "data.shuffle_buffer=20",
                      "data.datasets={image_colour: 1.0, text_arith: 1.0}"])
    return train_stage(cfg, out, progress=False)


def _eval(model: Path, manifest: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni.cli", "-q", "eval", str(model), "--data", manifest,
                           "--datasets", ",".join(TASKS), "--out", str(out), "--min-gain", "0.3"],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    return {"trained": _train(root / "trained", tiny_corpus, steps=80, lr="3e-3"),
            "untrained": _train(root / "untrained", tiny_corpus, steps=1, lr="1e-12"), "root": root}


def test_trained_model_beats_chance_and_blanked_media_on_held_out_samples(runs, tiny_corpus):
    done = _eval(runs["trained"], tiny_corpus, runs["root"] / "eval-trained")
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((runs["root"] / "eval-trained/eval.json").read_text())
    image, text = table["image"], table["text"]
    print(f"\nheld-out image_colour: accuracy {image['accuracy']:.2f}, blanked {image['blanked_accuracy']:.2f}, "
          f"chance {image['chance']:.2f}; text_arith {text['accuracy']:.2f} vs chance {text['chance']:.2f}")
    assert image["n"] >= 10 and text["n"] >= 10
    assert image["accuracy"] >= max(image["blanked_accuracy"], image["chance"]) + 0.3
    assert text["accuracy"] >= text["chance"] + 0.3


def test_min_gain_fails_for_the_untrained_model_and_names_the_task(runs, tiny_corpus):
    done = _eval(runs["untrained"], tiny_corpus, runs["root"] / "eval-untrained")
    assert done.returncode == 1
    assert "not learned" in done.stderr and "image_colour" in done.stderr
    assert "Traceback" not in done.stderr

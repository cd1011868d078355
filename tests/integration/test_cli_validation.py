"""Bad command-line values stop `omni` at once with one line naming the option and what it takes
(argparse's exit 2), instead of running on a meaningless value: a negative or zero --limit, a zero
--batch-size, a negative --gpu-mem, a demo port outside 1..65535 or idle time of 0, a --max-shard-size that is not a size, an --out that is an
existing file, an --eval that is not an eval.json, an unknown preset beside init_from."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli_error

ROOT = Path(__file__).resolve().parents[2]
STAGE = str(ROOT / "stages/tiny/2_sft.yaml")


def _omni(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "notes.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("argv, message", [
    (["eval", "m", "--data", "d.yaml", "--limit", "-3"], "argument --limit: -3 must be at least 1"),
    (["eval", "m", "--data", "d.yaml", "--limit", "0"], "argument --limit: 0 must be at least 1"),
    (["eval", "m", "--data", "d.yaml", "--limit", "all"], "argument --limit: 'all' is not a whole number"),
    (["eval", "m", "--data", "d.yaml", "--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    (["plan", STAGE, "--gpu-mem", "-1"], "argument --gpu-mem: -1 must be a number above 0"),
    (["plan", STAGE, "--gpu-mem", "nan"], "argument --gpu-mem: nan must be a number above 0"),
    (["plan", STAGE, "--gpus", "0"], "argument --gpus: 0 must be at least 1"),
    (["export", "--ckpt", "m", "--out", "x", "--max-shard-size", "lots"],
     "argument --max-shard-size: 'lots' is not a size; give e.g. 5GB, 500MB or a number of bytes"),
    (["export", "--ckpt", "m", "--out", "x", "--max-shard-size", "0"], "argument --max-shard-size: 0 must be above 0 bytes"),
    (["align", "eval", "sysbench", "--out", "o", "--limit", "-1"], "argument --limit: -1 must be at least 1"),
    (["data", "stats", "m.yaml", "--out", "o", "--limit", "0"], "argument --limit: 0 must be at least 1"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be at least 1"),
    (["demo", "--port", "-1"], "argument --port: -1 must be at least 1"),
    (["demo", "--port", "70000"], "argument --port: 70000 is not a port (1 to 65535)"),
    (["demo", "--idle-min", "0"], "argument --idle-min: 0 must be a number above 0"),
    (["demo", "--idle-min", "inf"], "argument --idle-min: inf must be a number above 0"),
])
def test_a_meaningless_number_is_refused_in_one_line(argv, message):
    done = _omni(*argv)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(message), done.stderr


@pytest.mark.parametrize("command", [["train", STAGE], ["schedule", str(ROOT / "stages/tiny/schedule.yaml")],
                                     ["align", "sft", str(ROOT / "omni/align/configs/tiny_sft.yaml")],
                                     ["consolidate", "runs/x/checkpoints/step-00000001"]])
def test_an_out_folder_that_is_an_existing_file_is_refused(command, a_file):
    done = _omni(*command, "--out", str(a_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        f"argument --out: {a_file} exists and is a file, not a folder; choose a folder path")
    assert a_file.read_text() == "not a folder"


def test_sizes_in_words_and_bytes_are_accepted():
    from omni.export.writer import shard_size

    assert (shard_size("5GB"), shard_size("500MB"), shard_size("1000")) == (5 * 10**9, 5 * 10**8, 1000)


def test_export_eval_that_is_a_jpeg_is_refused_naming_it(tiny_model, tmp_path):
    from PIL import Image

    from omni.model.load import save_model_dir

    model, tok = tiny_model
    folder = save_model_dir(model, tok, tmp_path / "final")
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), "red").save(jpeg)
    message = cli_error("-q", "export", "--ckpt", str(folder), "--out", str(tmp_path / "out"), "--eval", str(jpeg))
    assert message.startswith(f"export error: --eval {jpeg}: not an eval.json written by `omni eval`")
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_an_unknown_preset_is_refused_even_with_init_from(tmp_path):
    message = cli_error("-q", "train", STAGE, "--out", str(tmp_path / "run"), "preset=tiny-typo",
                         f"init_from={tmp_path / 'model'}")
    assert message == f"config error: {STAGE}: preset: 'tiny-typo' is unknown; choose one of ['7b', 'small', 'tiny']"

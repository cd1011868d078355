"""A dataset whose shards hold no sample (a valid but empty tar) stops training at once with one
line naming the dataset and the shard, on both data partitions, instead of resampling forever."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from omni.config import ConfigError
from omni.train.config import load_stage
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]


def _manifest(tmp_path: Path, tiny_corpus) -> Path:
    """The tiny corpus plus one dataset, `hollow`, whose only shard is an empty tar."""
    with tarfile.open(tmp_path / "hollow-000000.tar", "w"):
        pass
    data = yaml.safe_load(Path(tiny_corpus).read_text())
    for d in data["datasets"]:
        d["urls"] = str((Path(tiny_corpus).parent / d["urls"]).resolve())
    data["datasets"].append({"name": "hollow", "urls": "hollow-000000.tar", "num_samples": 10,
                             "modalities": [], "split": "train"})
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("partition", ["sample", "shard"])
def test_an_empty_dataset_stops_training_naming_it(tmp_path, tiny_corpus, partition):
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml",
                     [f"data.manifest={_manifest(tmp_path, tiny_corpus)}", "init_from=null", "steps=2",
                      "batch.micro_batch=4", f"data.partition={partition}",
                      "data.datasets={text_arith: 1.0, hollow: 1.0}"])
    with pytest.raises(ConfigError, match=r"dataset hollow: .* gave no sample \(last: .*hollow-000000.tar\)"):
        train_stage(cfg, tmp_path / "run", progress=False)


def test_the_command_line_says_it_in_one_line(tmp_path, tiny_corpus):
    done = subprocess.run([sys.executable, "-m", "omni.cli", "-q", "train", str(ROOT / "stages/tiny/2_sft.yaml"),
                           "--out", str(tmp_path / "run"), f"data.manifest={_manifest(tmp_path, tiny_corpus)}",
                           "init_from=null", "steps=2", "data.datasets={hollow: 1.0}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "dataset hollow" in done.stderr and "Traceback" not in done.stderr

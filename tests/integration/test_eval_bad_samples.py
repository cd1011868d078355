"""`omni eval` treats bad held-out samples as training does: skipped, counted in the table and named
in the log, never a traceback. Here: an image that does not decode, a placeholder without its
medium (refused by the processor), and a sample with no messages."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import webdataset as wds
import yaml

from omni.eval import evaluate


def _bad_val_set(tmp_path: Path, tiny_corpus) -> Path:
    man = yaml.safe_load(Path(tiny_corpus).read_text())
    entry = next(d for d in man["datasets"] if d["name"] == "image_colour" and d["split"] == "val")
    src = str((Path(tiny_corpus).parent / entry["urls"]).resolve())
    good = list(wds.DataPipeline(wds.SimpleShardList(src), wds.tarfile_to_samples()))[:6]
    meta = json.loads(good[0]["json"])
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as w:
        for s in good[:3]:
            w.write({k: v for k, v in s.items() if not k.startswith("__url")})
        w.write({"__key__": "garbage-image", "json": good[0]["json"], "png": b"not an image at all"})
        no_media = dict(meta, messages=meta["messages"])  # a placeholder, but no png member
        w.write({"__key__": "missing-medium", "json": json.dumps(no_media).encode()})
        w.write({"__key__": "no-messages", "json": json.dumps({"messages": [], "task": "image_colour"}).encode()})
        for s in good[3:]:
            w.write({k: v for k, v in s.items() if not k.startswith("__url")})
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"name": "bad-val", "datasets": [
        {"name": "image_colour", "split": "val", "urls": "val-000000.tar", "num_samples": 9,
         "modalities": ["image"], "task": "image_colour"}]}))
    return path


def test_eval_skips_counts_and_names_bad_held_out_samples(trained_tiny, tmp_path, tiny_corpus, caplog):
    manifest = _bad_val_set(tmp_path, tiny_corpus)
    with caplog.at_level(logging.WARNING):
        row = evaluate(trained_tiny, manifest, progress=False)["image"]
    assert row["n"] == 6 and row["skipped"] == 3
    for key in ("garbage-image", "missing-medium", "no-messages"):
        assert any(key in r.getMessage() and "val-000000.tar" in r.getMessage() for r in caplog.records), key
    clean = evaluate(trained_tiny, tiny_corpus, datasets=["image_colour"], limit=6, progress=False)["image"]
    assert row["accuracy"] == clean["accuracy"]  # the same six good samples, the same answers


def test_eval_command_line_reports_skips_without_a_traceback(trained_tiny, tmp_path, tiny_corpus):
    done = subprocess.run([sys.executable, "-m", "omni.cli", "-q", "eval", str(trained_tiny), "--data",
                           str(_bad_val_set(tmp_path, tiny_corpus))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "missing-medium" in done.stderr

"""Bad samples and corrupt shards are skipped, counted and reported; too many stop the run."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from PIL import Image

from omni.align.objectives.sft import SFT
from omni.data.loader import SkipCounter, TooManyBadSamples
from omni.data.training import training_stream
from omni.distributed import World
from omni.model.processor import OmniProcessor
from omni.train.config import load_stage

ROOT = Path(__file__).resolve().parents[2]


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def _sample(i: int, bad: str | None = None) -> dict:
    meta = {"messages": [{"role": "user", "content": "<image> what colour is the shape?"},
                         {"role": "assistant", "content": "red"}], "task": "t", "source": "test"}
    sample = {"__key__": f"s{i:04d}", "json": json.dumps(meta).encode(), "png": _png((200, 0, 0))}
    if bad == "image":
        sample["png"] = b"not a png at all"
    elif bad == "json":
        sample["json"] = b"{broken"
    elif bad == "placeholders":
        sample["json"] = json.dumps({**meta, "messages": [{"role": "user", "content": "<image> <image> x"},
                                                          {"role": "assistant", "content": "red"}]}).encode()
    return sample


def _write(tmp_path: Path, bad_every: int, truncate_second: bool = False) -> Path:
    shards = tmp_path / "shards"
    shards.mkdir()
    kinds = ["image", "json", "placeholders"]
    for s in range(2):
        with wds.TarWriter(str(shards / f"d-{s:06d}.tar")) as w:
            for i in range(s * 50, s * 50 + 50):
                w.write(_sample(i, kinds[i % 3] if bad_every and i % bad_every == 0 else None))
    if truncate_second:
        data = (shards / "d-000001.tar").read_bytes()
        (shards / "d-000001.tar").write_bytes(data[: len(data) // 2 + 123])
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"name": "bad", "datasets": [
        {"name": "d", "urls": "shards/d-{000000..000001}.tar", "num_samples": 100, "modalities": ["image"]}]}))
    return manifest


def _stream(manifest, tiny_model, counter):
    """The trainer's own path: raw sample -> record -> the stage objective's example."""
    model, tok = tiny_model
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", [f"data.manifest={manifest}", "init_from=null",
                                                        "data.shuffle_buffer=10", "data.datasets={}"])
    sft = SFT(cfg)
    sft.prepare(model, tok, OmniProcessor.from_config(model.config, tok, model.token_ids), manifest.parent, None,
                [], World())
    return training_stream(cfg.data, None, 0, sft.make, counter)


def test_bad_samples_are_skipped_counted_and_named(tmp_path, tiny_model, caplog):
    manifest = _write(tmp_path, bad_every=10)
    counter = SkipCounter(max_fraction=0.2, min_seen=20)
    stream = _stream(manifest, tiny_model, counter)
    with caplog.at_level(logging.WARNING):
        got = stream.take(90)
    assert len(got) == 90 and counter.good == 90
    assert counter.skipped == stream.consumed - 90 > 0
    text = "\n".join(counter.reasons)
    assert "field 'png' does not decode" in text and "not valid JSON" in text and "placeholder" in text
    assert "d-00000" in text and "sample s0" in text  # shard and key are named


def test_a_truncated_shard_is_counted_and_training_goes_on(tmp_path, tiny_model):
    manifest = _write(tmp_path, bad_every=0, truncate_second=True)
    counter = SkipCounter(max_fraction=0.5, min_seen=20)
    got = _stream(manifest, tiny_model, counter).take(120)
    assert len(got) == 120
    assert counter.skipped >= 1 and any("shard read" in r for r in counter.reasons)


def test_too_many_bad_samples_stop_the_run(tmp_path, tiny_model):
    manifest = _write(tmp_path, bad_every=2)
    counter = SkipCounter(max_fraction=0.1, min_seen=20)
    with pytest.raises(TooManyBadSamples, match="samples skipped"):
        _stream(manifest, tiny_model, counter).take(60)

"""`omni data lmms-task` writes the items `omni eval` scores: same samples in the same order, media
files that decode to exactly the shards' media, prompts that come back as the same omni messages,
and `omni eval`'s scoring rule. (lmms-eval itself runs them in tests/integration/test_lmms_eval.py.)"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from omni.data.loader import SkipCounter, chat_turns
from omni.data.manifest import load_manifest
from omni.data.synth import SynthConfig, write_corpus
from omni.eval import held_out_samples
from omni.inference import load_media
from omni.integrations.lmms_task import doc_to_messages, process_results, write_tasks
from tests.helpers import cli_error

DATASETS = ["image_colour", "video_colour_change", "audio_note", "image_audio_side", "text_arith"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return write_corpus(SynthConfig(out_dir=str(out), train_per_task=2, val_per_task=4, samples_per_shard=8),
                        progress=False)


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory):
    return write_tasks(corpus, tmp_path_factory.mktemp("tasks"), datasets=DATASETS, limit=3)


def _docs(written, name):
    return [json.loads(line) for line in (written.folder / f"{name}.jsonl").read_text().splitlines()]


def test_one_task_per_dataset_named_and_sized(written):
    assert written.tasks == {f"omni_{d}": 3 for d in DATASETS}
    for task in written.tasks:
        text = (written.folder / f"{task}.yaml").read_text().replace("!function ", "")
        spec = yaml.safe_load(text)
        assert spec["task"] == task and spec["output_type"] == "generate_until"
        assert spec["doc_to_messages"] == "utils.doc_to_messages"
    assert "omni.integrations.lmms_task" in (written.folder / "utils.py").read_text()


@pytest.mark.parametrize("name", DATASETS)
def test_items_are_omni_evals_items_with_the_same_media(corpus, written, name):
    entry = load_manifest(corpus).select("val", [name])[0]
    samples = held_out_samples(entry, SkipCounter(max_fraction=0.5, min_seen=10), 3)
    docs = _docs(written, name)
    assert len(docs) == len(samples) == 3
    for (prompt, media, answer, _), doc in zip(samples, docs):
        assert doc["messages"] == prompt and doc["answer"] == answer
        files = load_media(doc["image"], doc["video"], doc["audio"])
        assert sorted(files) == sorted(media)
        for a, b in zip(media.get("image", []), files.get("image", [])):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(media.get("audio", []), files.get("audio", [])):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        for a, path in zip(media.get("video", []), files.get("video", [])):
            assert Path(path).read_bytes() == a


@pytest.mark.parametrize("name", DATASETS)
def test_messages_come_back_as_the_same_omni_prompt(written, name):
    for doc in _docs(written, name):
        messages = doc_to_messages(doc)
        parts = [(p["type"], p["url"]) for m in messages for p in m["content"] if p["type"] != "text"]
        kinds = re.findall(r"<(image|video|audio)>", " ".join(m["content"] for m in doc["messages"]))
        assert parts == [(kind, doc[kind][kinds[:i].count(kind)]) for i, kind in enumerate(kinds)]
        typed = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                                 for p in m["content"]]} for m in messages]
        assert chat_turns(typed, "test") == doc["messages"]


def test_score_is_omni_evals_rule():
    doc = {"answer": "red"}
    assert process_results(doc, ["Red."]) == {"accuracy": 1.0}
    assert process_results(doc, ["blue"]) == {"accuracy": 0.0}


def test_an_unknown_dataset_is_one_line(corpus, tmp_path):
    line = cli_error("data", "lmms-task", str(corpus), "--out", str(tmp_path), "--datasets", "image_colour,nope")
    assert line.startswith("omni data lmms-task:") and "nope" in line and "\n" not in line

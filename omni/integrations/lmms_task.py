"""`omni data lmms-task`: held-out samples of a manifest as local lmms-eval tasks, one per dataset,
for `lmms-eval --model omni --include_path DIR --tasks omni_NAME,...`.

    DIR/omni_NAME.yaml     the task: prompt from `doc_to_messages`, score from `process_results`
    DIR/NAME.jsonl         one item a line: the prompt turns, media paths by kind, the answer
    DIR/media/NAME/        the item's media as files (PNG, MP4, 16-bit WAV)
    DIR/utils.py           imports the two functions below (lmms-eval loads them from the task's folder)

The items are the ones `omni eval` scores for the same split, datasets and limit (omni.eval's
`held_out_samples`), and the score is its rule (`answer_matches`), so the two accuracies agree.
A prompt becomes typed parts split at its placeholders; omni joins such parts with single spaces
(docs/data_format.md), so a prompt whose placeholders are not set off by single spaces reaches
the model with its spacing normalised (counted in the writer's log line).
"""
from __future__ import annotations

import json
import logging
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni.data.loader import SkipCounter
from omni.data.manifest import load_manifest
from omni.eval import answer_matches, held_out_samples
from omni.modalities import MODALITIES, PLACEHOLDERS

log = logging.getLogger(__name__)
_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS.values()) + ")")
_KIND = {p: m for m, p in PLACEHOLDERS.items()}
_UTILS = '''"""Written by `omni data lmms-task`: the prompt and the score of these tasks are omni's."""
from omni.integrations.lmms_task import doc_to_messages, doc_to_text, process_results  # noqa: F401
'''
_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: generate_until
doc_to_messages: !function utils.doc_to_messages
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@dataclass
class TaskSet:
    folder: Path
    tasks: dict[str, int]       # lmms-eval task name -> items


def _parts(text: str, paths: dict[str, list[str]], used: dict[str, int]) -> list[dict]:
    """One message's text as lmms-eval content parts: texts and the media its placeholders bind."""
    parts = []
    for piece in _SPLIT.split(text):
        if piece in _KIND:
            kind = _KIND[piece]
            parts.append({"type": kind, "url": paths[kind][used.get(kind, 0)]})
            used[kind] = used.get(kind, 0) + 1
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs=None) -> list[dict]:
    """The item's prompt turns as lmms-eval chat messages."""
    used: dict[str, int] = {}
    paths = {kind: doc[kind] for kind in MODALITIES}
    return [{"role": m["role"], "content": _parts(m["content"], paths, used)} for m in doc["messages"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    """The last prompt turn's text (lmms-eval logs it; the model reads `doc_to_messages`)."""
    return doc["messages"][-1]["content"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(answer_matches(results[0], doc["answer"]))}


def _write_wav(path: Path, waveform: np.ndarray) -> None:
    """16 kHz mono 16-bit: the loader decoded it to exactly these values (s16 / 32768)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.clip(np.round(waveform * 32768), -32768, 32767).astype("<i2").tobytes())


def _write_media(folder: Path, stem: str, media: dict[str, list]) -> dict[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[str]] = {kind: [] for kind in MODALITIES}
    for kind, items in media.items():
        for k, item in enumerate(items):
            path = folder / f"{stem}-{kind}{k}.{'png' if kind == 'image' else 'mp4' if kind == 'video' else 'wav'}"
            if kind == "image":
                item.save(path)
            elif kind == "video":
                path.write_bytes(item)
            else:
                _write_wav(path, item)
            paths[kind].append(str(path.resolve()))
    return paths


def write_tasks(manifest_path: str | Path, out_dir: str | Path, split: str = "val",
                datasets: list[str] | None = None, limit: int | None = None,
                max_new_tokens: int = 8) -> TaskSet:
    """Write one lmms-eval task per dataset of `split` (see the module docstring); the data files are
    named by absolute paths, so the folder stays where it was written."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text(_UTILS)
    tasks = {}
    for entry in load_manifest(manifest_path).select(split, datasets):
        samples = held_out_samples(entry, SkipCounter(max_fraction=0.5, min_seen=10), limit)
        respaced, docs = 0, []
        with open(out / f"{entry.name}.jsonl", "w") as f:
            for prompt, media, answer, place in samples:
                texts = [m["content"] for m in prompt]
                if any(sum(t.count(PLACEHOLDERS[k]) for t in texts) != len(media.get(k, [])) for k in MODALITIES):
                    log.warning("%s: placeholders and media do not match; left out (omni eval refuses it too)", place)
                    continue
                paths = _write_media(out / "media" / entry.name, f"{len(docs):06d}", media)
                docs.append({"id": len(docs), "messages": prompt, **paths, "answer": answer})
                respaced += any(" ".join(p.strip() for p in _SPLIT.split(t) if p.strip()) != t for t in texts)
            f.writelines(json.dumps(doc) + "\n" for doc in docs)
        if respaced:
            log.warning("%s: %d of %d prompts have placeholders not set off by single spaces; lmms-eval "
                        "sends them with normalised spacing", entry.name, respaced, len(docs))
        task = f"omni_{entry.name}"
        (out / f"{task}.yaml").write_text(_YAML.format(task=task, jsonl=json.dumps(str(out / f"{entry.name}.jsonl")),
                                                       max_new_tokens=max_new_tokens))
        tasks[task] = len(docs)
    return TaskSet(out, tasks)

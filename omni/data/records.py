"""Alignment data: chat and preference records from JSONL or WebDataset, and the examples built
from them with the omni processor (same chat template, same assistant-only label mask).

Records (docs/data_format.md)
    chat        {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}, a reply after a
                user turn; `content` a string or typed parts (omni.data.loader.chat_turns)
    preference  {"prompt": messages or a string, "chosen": reply, "rejected": reply}
                a reply is a string, an assistant message, or a list of messages (TRL's
                conversational format); the prompt may hold earlier turns and media placeholders.
Sources (`read_records(spec)`, $VARS expanded): a `.jsonl` file (one record per line), a `.json` array, a
manifest YAML (its datasets of one split, read once through webdataset), or a shard path /
brace pattern. WebDataset samples keep their media members undecoded, and media are decoded only
when an example is built, by the data layer's one media decoder (`decode_media`).

A stage's `data.records` are read once into memory (text is small; media stay undecoded bytes)
and served by a RecordStream (omni/data/stream.py). A stage's streamed `data.manifest` samples
become the same records through `record_from_raw`: every objective reads one record format.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import webdataset as wds

from omni.data.loader import SkipCounter, chat_turns, decode_media, read_json, split_stream
from omni.data.loader import where as sample_where
from omni.data.manifest import load_manifest
from omni.errors import SampleError
from omni.modalities import SPOKEN_ANSWER, input_member
from omni.model.fusion import IGNORE
from omni.model.processor import Example, last_span


class AlignDataError(SampleError):
    """A data source or record cannot be used; the message names the file/sample and the field."""


def read_records(spec: str | Path, split: str = "train", datasets: list[str] | None = None) -> list[dict]:
    """All records of a source (see the module docstring). Each gets `__where__` for messages."""
    spec = os.path.expandvars(str(spec))
    path = Path(spec)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise AlignDataError(f"{path}: no such file")
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise AlignDataError(f"{path}:{n}: not valid JSON ({e})") from None
                rec["__where__"] = f"{path}:{n}"
                out.append(rec)
        return out
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AlignDataError(f"{path}: cannot read a JSON array ({e})") from None
        return [{**rec, "__where__": f"{path}[{i}]"} for i, rec in enumerate(data)]
    if path.suffix in (".yaml", ".yml"):
        entries = load_manifest(path).select(split, datasets)
        raws = [raw for e in entries for raw in split_stream(e, SkipCounter(max_fraction=0.5))]
    else:
        raws = list(wds.DataPipeline(wds.SimpleShardList(spec), wds.tarfile_to_samples()))
    if not raws:
        raise AlignDataError(f"{spec}: no samples found")
    return [record_from_raw(raw) for raw in raws]


def record_from_raw(raw: dict) -> dict:
    """A WebDataset sample (docs/data_format.md) as a record: its json fields, its media members
    kept as undecoded bytes under `__media__`, its spoken answer's bytes (if any) under
    `__speech__`, and where it came from (`__where__`)."""
    rec = read_json(raw)
    media = {k: v for k, v in raw.items() if input_member(k)}
    if media:
        rec["__media__"] = media
    if SPOKEN_ANSWER in raw:
        rec["__speech__"] = raw[SPOKEN_ANSWER]
    rec["__where__"] = sample_where(raw)
    return rec


def record_media(rec: dict) -> dict[str, list]:
    """Decoded media of a WebDataset record (placeholder order), {} for text records."""
    if "__media__" not in rec:
        return {}
    return decode_media(rec["__media__"], rec["__where__"])


def _reply(value, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict) and "content" in value:
        return chat_turns([{"role": value.get("role", "assistant"), "content": value["content"]}], where, field)
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return chat_turns(value, where, field)
    raise AlignDataError(f"{where}: field '{field}' must be a string, an assistant message or a list of messages")


def chat_messages(rec: dict) -> list[dict]:
    """The record's messages (see `chat_turns`) with an assistant reply that follows a user turn."""
    where = rec.get("__where__")
    msgs = chat_turns(rec.get("messages"), where)
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise AlignDataError(f"{where}: no assistant message to learn from")
    if "user" not in roles[:roles.index("assistant")]:
        raise AlignDataError(f"{where}: field 'messages' has an assistant reply with no user turn before it; "
                             "a training sample needs the user turn the reply answers")
    return msgs


def preference_messages(rec: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, prompt + chosen, prompt + rejected) message lists."""
    where = rec.get("__where__")
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            raise AlignDataError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected' (no {key!r})")
    prompt = rec["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else chat_turns(prompt, where, "prompt")
    if not prompt or prompt[-1]["role"] != "user":
        raise AlignDataError(f"{where}: field 'prompt' must be a string or messages ending with a user turn")
    return prompt, prompt + _reply(rec["chosen"], where, "chosen"), prompt + _reply(rec["rejected"], where, "rejected")


def sft_example(processor, rec: dict, turns: str = "all") -> Example:
    """Loss on every assistant turn (`all`) or the last one only (`last`)."""
    ex = processor(chat_messages(rec), record_media(rec))
    if turns == "last":
        ex.labels = last_span(ex.labels)
    if not (ex.labels != IGNORE).any():
        raise SampleError(f"{rec.get('__where__')}: no label tokens")
    return ex


def preference_examples(processor, rec: dict) -> tuple[Example, Example]:
    """Chosen and rejected examples; labels cover the final reply only (the compared completion)."""
    _, chosen, rejected = preference_messages(rec)
    media = record_media(rec)
    out = []
    for msgs in (chosen, rejected):
        ex = processor(msgs, media)
        ex.labels = last_span(ex.labels)
        out.append(ex)
    return out[0], out[1]


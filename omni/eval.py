"""Held-out accuracy per modality, next to chance and to the same model with its media blanked.

The blanked control replaces every medium with an empty one of the same size (zero pixels,
silence), so token counts are unchanged and any accuracy above chance must come from text
priors; the gap between the two columns is what the media contribute.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from omni.data.loader import SkipCounter, decode_sample, split_stream, where
from omni.data.manifest import DatasetEntry, load_manifest
from omni.errors import SampleError
from omni.model.generate import LocalGenerator

EVAL_FILE = "eval.json"


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace(" .", ".").split()).strip(" .")


def answer_matches(said: str, reference: str) -> bool:
    """The accuracy rule of `omni eval` (and of its lmms-eval tasks): equal up to case, spacing and a
    final full stop."""
    return _normalise(said) == _normalise(reference)


def _answer(meta: dict, messages: list[dict]) -> str:
    if "answer" in meta:
        return meta["answer"]
    return messages[-1]["content"]


def answers_correct(generator: LocalGenerator, samples: list[tuple], blank: bool, max_new_tokens: int,
                    refused: dict, desc: str = "", progress: bool = True) -> list[bool]:
    """Greedy answer == reference for each sample that the processor takes; a sample it refuses is
    left out and noted in `refused` (where -> error). One batch of the generator at a time."""
    results = []
    size = generator.batch_size
    for i in tqdm(range(0, len(samples), size), desc=desc, disable=not progress, leave=False):
        examples, kept = [], []
        for prompt, media, answer, place in samples[i: i + size]:
            try:
                examples.append(generator.prompt(prompt, media, max_new_tokens, blank=blank))
                kept.append(answer)
            except Exception as e:  # noqa: BLE001 - any preprocessing failure is the sample's
                refused[place] = e
        if not examples:
            continue
        answers = generator.generate(examples, max_new_tokens)
        results += [answer_matches(said, answer) for said, answer in zip(answers, kept)]
    return results


def _sample(raw: dict) -> tuple:
    """(prompt messages, media, reference answer, where) of a held-out sample; raises on a bad one."""
    meta, messages, media = decode_sample(raw)
    if not messages:
        raise SampleError(f"{where(raw)}: field 'json.messages' is empty")
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return prompt, media, _answer(meta, messages), where(raw)


def held_out_samples(entry: DatasetEntry, counter: SkipCounter, limit: int | None = None) -> list[tuple]:
    """The first `limit` usable samples of one dataset in shard order, as `_sample` tuples; a bad one
    is counted in `counter` and named in the log. `omni eval` scores these and `omni data lmms-task`
    writes these, so both see the same items."""
    samples = []
    for raw in split_stream(entry, counter):
        try:
            samples.append(_sample(raw))
        except Exception as e:  # noqa: BLE001 - counted and named, like training
            counter.skip(where(raw), e)
            continue
        if limit and len(samples) >= limit:
            break
    return samples


def evaluate(model_dir: str | Path, manifest_path: str | Path, split: str = "val",
             datasets: list[str] | None = None, limit: int | None = None, batch_size: int = 32,
             max_new_tokens: int = 8, progress: bool = True, device: str | None = None,
             dtype: str | None = None) -> dict:
    """Accuracy table keyed by modality ("image", "video", "audio", "image+audio", "text"). Bad
    held-out samples are skipped, counted (`skipped`) and named in the log, as in training.
    `device`, `dtype`: where the model runs (omni.model.generate.resolve_placement)."""
    generator = LocalGenerator.load(model_dir, batch_size=batch_size, device=device, dtype=dtype)
    entries = load_manifest(manifest_path).select(split, datasets)
    keys = ["+".join(e.modalities) or "text" for e in entries]
    results = {}
    for entry, key in zip(entries, keys):
        if keys.count(key) > 1:
            key = entry.name
        counter = SkipCounter(max_fraction=0.5, min_seen=10)
        samples = held_out_samples(entry, counter, limit)
        refused: dict[str, Exception] = {}
        accuracy = {}
        for blank in (False, True):  # the blanked pass runs on the samples the first one took
            right = answers_correct(generator, samples, blank, max_new_tokens, refused,
                                    desc=f"{key}{' (blanked)' if blank else ''}", progress=progress)
            accuracy[blank] = sum(right) / max(1, len(right))
            samples = [s for s in samples if s[3] not in refused]
        for place, err in refused.items():  # counted once, like training's bad samples
            counter.skip(place, err)
        results[key] = {"task": entry.task or entry.name, "n": len(samples), "skipped": counter.skipped,
                        "chance": 1.0 / max(1, len({_normalise(s[2]) for s in samples})),
                        "accuracy": accuracy[False], "blanked_accuracy": accuracy[True]}
    return results


def format_table(results: dict) -> str:
    lines = [f"{'modality':<14}{'task':<22}{'n':>6}{'accuracy':>10}{'blanked':>10}{'chance':>9}"]
    for key, r in results.items():
        lines.append(f"{key:<14}{r['task']:<22}{r['n']:>6}{r['accuracy']:>10.3f}"
                     f"{r['blanked_accuracy']:>10.3f}{r['chance']:>9.3f}")
    return "\n".join(lines)


def not_learned(results: dict, min_gain: float) -> list[str]:
    """Rows whose accuracy does not beat chance and the blanked control by `min_gain` (text rows have
    no media to blank: chance only), as lines for the user; [] when the model learned every task."""
    failures = []
    for key, r in results.items():
        bar = r["chance"] if key == "text" else max(r["chance"], r["blanked_accuracy"])
        if r["accuracy"] < bar + min_gain:
            failures.append(f"{key} ({r['task']}): accuracy {r['accuracy']:.3f} < {bar:.3f} + {min_gain} "
                            f"(chance {r['chance']:.3f}, blanked {r['blanked_accuracy']:.3f})")
    return failures


def write_results(results: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path

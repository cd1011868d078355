"""The voice guard: a schedule's `speech_eval` step (docs/speech_out.md, "Guarding the voice").

A thinker stage after speech_out changes the hidden states and embeddings the talker was trained to
read, while the talker's own weights stay as they were: its text answers can stay right while its
speech goes wrong, and nothing in the thinker stage's loss says so. The step scores the model of the
stage before it by ear (`omni eval --speech`, omni/speech_eval.py) and stops the schedule when a
dataset's spoken accuracy is below `min_spoken` or fell more than `max_drop` below its score after the
last speech_out stage. Scores are recorded per stage (`STAGE/speech_eval.json`), so a resumed schedule
and every later step compare against the same numbers instead of scoring a model twice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omni.speech_eval import evaluate_speech
from omni.train.config import SpeechEvalStep
from omni.train.trainer import FINAL

GUARD_FILE = "speech_eval.json"


class SpeechRegression(RuntimeError):
    """Spoken answers fell below a speech_eval step's bounds; the message names each dataset, its score,
    the bound and what to do."""


@dataclass
class ScoredStage:
    """A stage run folder whose final model a speech_eval step scores, and the corpus it is scored on."""
    name: str
    out_dir: Path
    manifest: str


def record_scores(stage: ScoredStage, step: SpeechEvalStep, progress: bool = True) -> Path:
    """Score the step's datasets on `stage`'s final model unless its record already holds them (same
    manifest and limit), and write the record: `omni eval --speech`'s rows keyed by dataset."""
    path = stage.out_dir / GUARD_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("manifest") != stage.manifest or record.get("limit") != step.limit:
        record = {"manifest": stage.manifest, "split": "val", "limit": step.limit, "datasets": {}}
    missing = [d for d in step.datasets if d not in record["datasets"]]
    if missing:
        results = evaluate_speech(stage.out_dir / FINAL, stage.manifest, datasets=missing, limit=step.limit,
                                  progress=progress)
        record["datasets"].update({row["dataset"]: row for row in results.values()})
        path.write_text(json.dumps(record, indent=2))
    return path


def spoken(stage: ScoredStage, datasets: list[str]) -> dict[str, float]:
    rows = json.loads((stage.out_dir / GUARD_FILE).read_text())["datasets"]
    return {d: rows[d]["spoken_accuracy"] for d in datasets}


def check_speech(step: SpeechEvalStep, stage: ScoredStage, baseline: ScoredStage | None) -> dict[str, float]:
    """The stage's recorded spoken accuracy per dataset; SpeechRegression (one line) where it breaks a bound.
    `baseline`: the last speech_out stage up to `stage` (itself when `stage` is one); needed for max_drop."""
    scores = spoken(stage, step.datasets)
    before = spoken(baseline, step.datasets) if baseline is not None and step.max_drop is not None else {}
    failures = []
    for d, score in scores.items():
        broken = []
        if step.min_spoken is not None and score < step.min_spoken:
            broken.append(f"< min_spoken {step.min_spoken:.2f}")
        if d in before and before[d] - score > step.max_drop:
            broken.append(f"{before[d] - score:.3f} below {before[d]:.3f} after {baseline.name} "
                          f"(max_drop {step.max_drop:.2f})")
        if broken:
            failures.append(f"{d} spoken accuracy {score:.3f} {', '.join(broken)}")
    if not failures:
        return scores
    if baseline is not None and baseline.name == stage.name:
        todo = "the talker has not learned to speak these answers: train the speech_out stage longer"
    else:
        todo = (f"{stage.name} changed what the talker hears from the thinker: run a speech_out stage after it "
                "(init_from: previous), or train the talker with it (add talker.* to its trainable), "
                "or freeze the parts it trains")
    raise SpeechRegression(f"speech_eval after {stage.name}: {'; '.join(failures)} "
                           f"(scores in {stage.out_dir / GUARD_FILE}); {todo}")

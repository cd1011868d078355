"""The voice guard (docs/speech_out.md, "Guarding the voice"): a schedule's `speech_eval` step passes on
the talker as the speech_out stage trained it, and after a thinker stage that moves the hidden states
the talker reads, `omni schedule` stops with one line naming the dataset, the score, the score after
speech_out, the allowed drop and what to do. Real models throughout: the session's speaking model
(tests/conftest.py, shared with test_speech_out.py) stands in for the schedule's speech_out stage, so
the schedule resumes past it as it would after a finished speech_out stage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from omni.cli.main import main
from omni.config import ConfigError
from omni.schedule import run_schedule
from omni.speech_guard import GUARD_FILE
from tests.helpers import cli_error

ROOT = Path(__file__).resolve().parents[2]
GUARD = {"datasets": ["image_colour"], "min_spoken": 0.9, "max_drop": 0.1, "limit": 12}
# a thinker fine-tune on another task (20 steps of SFT on arithmetic, thinker only, talker untouched);
# measured on image_colour: text 1.000 -> 0.417, spoken 1.000 -> 0.083 (the talker says the thinker's
# text answer for 1 of 12: the speech breaks beyond what the text lost)
THINKER = {"name": "stage4-thinker", "steps": 20, "optim.lr": "3e-3", "optim.warmup_steps": 0,
           "batch.micro_batch": 16, "data.datasets": {"text_arith": 1.0}}


def _stage(folder: Path, base: str, changes: dict) -> str:
    """stages/tiny/BASE with dotted-key changes, written to `folder`: its path."""
    cfg = yaml.safe_load((ROOT / "stages/tiny" / base).read_text())
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path = folder / base
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _schedule(folder: Path, name: str, stages: list) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}))
    return path


@pytest.fixture(scope="module")
def guarded_run(speaking_model, spoken_corpus, tmp_path_factory):
    """`omni schedule` of speech_out then a speech_eval step, its speech_out stage done (the session's
    speaking model as its final/): the run folder."""
    out, folder = tmp_path_factory.mktemp("guarded-run"), tmp_path_factory.mktemp("guarded-stages")
    shutil.copytree(speaking_model, out / "stage3-speech-out" / "final")
    speech = _stage(folder, "3_speech_out.yaml", {"init_from": str(Path(speaking_model).parents[1] / "thinker/final")})
    sched = _schedule(folder, "speech", [speech, {"speech_eval": GUARD}])
    main(["-q", "schedule", str(sched), "--out", str(out), f"data.manifest={spoken_corpus}"])
    return out, speech


def test_the_guard_passes_on_the_talker_as_trained(guarded_run):
    guarded_run, _ = guarded_run
    record = json.loads((guarded_run / "stage3-speech-out" / GUARD_FILE).read_text())
    row = record["datasets"]["image_colour"]
    print(f"\nafter speech_out: image_colour spoken {row['spoken_accuracy']:.3f} text {row['text_accuracy']:.3f}")
    assert row["n"] == GUARD["limit"] and row["spoken_accuracy"] >= GUARD["min_spoken"]
    assert (guarded_run / "final").is_dir()  # the schedule went past the step


def test_a_thinker_stage_that_breaks_the_voice_stops_the_schedule(guarded_run, spoken_corpus, tmp_path):
    """The same run folder, resumed with a thinker stage after the speech_out stage: the recorded score
    after speech_out is the baseline (not scored again), the thinker stage trains, the step fails."""
    guarded_run, speech = guarded_run
    sched = _schedule(tmp_path, "finetune", [speech, {"speech_eval": GUARD}, _stage(tmp_path, "2_sft.yaml", THINKER),
                                              {"speech_eval": GUARD}])
    line = cli_error("-q", "schedule", str(sched), "--out", str(guarded_run), f"data.manifest={spoken_corpus}")
    before = json.loads((guarded_run / "stage3-speech-out" / GUARD_FILE).read_text())["datasets"]["image_colour"]
    after = json.loads((guarded_run / "stage4-thinker" / GUARD_FILE).read_text())["datasets"]["image_colour"]
    print(f"\n{line}\nafter the thinker stage: spoken {after['spoken_accuracy']:.3f} text {after['text_accuracy']:.3f} "
          f"frames {after['frame_accuracy']:.3f}")
    assert before["spoken_accuracy"] - after["spoken_accuracy"] > GUARD["max_drop"]  # the voice really broke
    assert "\n" not in line and line.startswith("omni schedule: speech_eval after stage4-thinker: image_colour")
    assert f"{after['spoken_accuracy']:.3f}" in line and f"{before['spoken_accuracy']:.3f}" in line
    assert "max_drop 0.10" in line and "speech_out stage after it" in line
    assert (guarded_run / "stage4-thinker" / "final").is_dir()


def test_speech_eval_steps_are_checked_before_any_stage_trains(spoken_corpus, tmp_path):
    speech, sft = str(ROOT / "stages/tiny/3_speech_out.yaml"), str(ROOT / "stages/tiny/2_sft.yaml")
    cases = [
        ([sft, {"speech_eval": {**GUARD, "min_spoken": None}}], "max_drop compares with the score after a speech_out"),
        ([speech, {"speech_eval": {**GUARD, "datasets": ["image_colur"]}}], "no 'val' dataset(s) ['image_colur']"),
        ([speech, {"speech_eval": {**GUARD, "max_drop": 10}}], "stages[1].speech_eval: max_drop: 10.0 is not"),
        ([speech, {"speech_eval": {"datasets": ["image_colour"]}}], "give min_spoken, max_drop or both"),
        ([speech, {"speech_evl": GUARD}], "stages[1]: unknown key(s) ['speech_evl']"),
        ([{"speech_eval": GUARD}, speech], "stages[0]: a schedule starts with a stage file"),
    ]
    for i, (stages, message) in enumerate(cases):
        with pytest.raises(ConfigError) as err:
            run_schedule(_schedule(tmp_path, f"bad{i}", stages), tmp_path / "out", [f"data.manifest={spoken_corpus}",
                                                                                   "init_from=null"])
        assert message in str(err.value), (message, str(err.value))
    assert not (tmp_path / "out").exists()

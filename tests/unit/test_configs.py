"""Every shipped YAML loads, and the strict loader rejects what it should."""
from __future__ import annotations

from pathlib import Path

import pytest

from omni.config import ConfigError
from omni.data.manifest import load_manifest
from omni.presets import PRESETS, build_preset
from omni.train.config import SpeechEvalStep, load_schedule, load_stage

ROOT = Path(__file__).resolve().parents[2]
STAGE_FILES = sorted(p for p in (ROOT / "stages").rglob("*.yaml") if not p.name.startswith("schedule"))


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_stage_yaml_loads(path):
    cfg = load_stage(path)
    assert cfg.preset in PRESETS
    assert cfg.steps > 0


@pytest.mark.parametrize("size", ["tiny", "7b"])
def test_schedules_list_existing_stages_with_the_same_keys(size):
    sched, files = load_schedule(ROOT / "stages" / size / "schedule.yaml")
    assert [f.name for f in files] == [f.name for f in load_schedule(ROOT / "stages/7b/schedule.yaml")[1]]
    first, *rest = [load_stage(f) for f in files]
    assert first.init_from is None and all(s.init_from == "previous" for s in rest)
    assert rest[-1].name == "stage2-sft"


@pytest.mark.parametrize("size", ["tiny", "7b"])
def test_speech_schedules_add_the_speech_out_stage(size):
    sched, files = load_schedule(ROOT / "stages" / size / "schedule_speech.yaml")
    assert [f.name for f in files] == [f.name for f in load_schedule(ROOT / "stages" / size / "schedule.yaml")[1]] \
        + ["3_speech_out.yaml"]
    steps = [s for s in sched.stages if isinstance(s, SpeechEvalStep)]
    if size == "tiny":  # scored after speech_out (the 7B set's free-form replies have no candidate words)
        assert sched.stages[-2:] == ["3_speech_out.yaml", steps[0]] and steps[0].min_spoken == 0.9


def test_tiny_and_7b_stage_twins_train_the_same_parts():
    for tiny in sorted((ROOT / "stages/tiny").glob("[12]*.yaml")):
        big = load_stage(ROOT / "stages/7b" / tiny.name)
        small = load_stage(tiny)
        assert (small.name, small.trainable) == (big.name, big.trainable)


@pytest.mark.parametrize("path", sorted((ROOT / "data_manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_loads(path, monkeypatch):
    monkeypatch.setenv("OMNI_DATA", "/data/omni")
    manifest = load_manifest(path)
    assert manifest.datasets and all(d.num_samples > 0 for d in manifest.datasets)


def test_7b_stages_name_datasets_that_the_manifest_has(monkeypatch):
    monkeypatch.setenv("OMNI_DATA", "/data/omni")
    for path in sorted((ROOT / "stages/7b").glob("[12]*.yaml")):
        cfg = load_stage(path)
        load_manifest(ROOT / cfg.data.manifest).select(cfg.data.split, list(cfg.data.datasets))


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "stages/tiny/2_sft.yaml").read_text() + "optim_lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim_lr"):
        load_stage(bad)


def test_nested_unknown_key_and_wrong_type(tmp_path):
    src = ROOT / "stages/tiny/2_sft.yaml"
    with pytest.raises(ConfigError, match="optim.*lrr"):
        load_stage(src, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="steps.*integer"):
        load_stage(src, ["steps=ten"])


def test_overrides_apply():
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", ["optim.lr=0.5", "batch.micro_batch=3"])
    assert cfg.optim.lr == 0.5 and cfg.batch.micro_batch == 3


def test_engine_and_trainable_validation():
    src = ROOT / "stages/tiny/2_sft.yaml"
    with pytest.raises(ConfigError, match="engine"):
        load_stage(src, ["engine=horovod"])
    with pytest.raises(ConfigError, match="trainable"):
        load_stage(src, ["trainable=[]"])


def test_preset_overrides_and_unknown_preset():
    cfg = build_preset("tiny", ["llm.hf_config.num_hidden_layers=1"])
    assert cfg.llm.hf_config["num_hidden_layers"] == 1
    with pytest.raises(ConfigError, match="preset"):
        build_preset("13b")


def test_exponent_without_dot_is_a_number():
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", ["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4


def test_compile_is_a_bool():
    assert load_stage(ROOT / "stages/tiny/2_sft.yaml", ["compile=true"]).compile is True
    with pytest.raises(ConfigError, match="compile"):
        load_stage(ROOT / "stages/tiny/2_sft.yaml", ["compile=yes please"])

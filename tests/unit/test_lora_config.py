"""A stage's `lora:` section is checked at load, and its globs against the model before training:
each mistake is one ConfigError line that says what to change."""
from __future__ import annotations

from pathlib import Path

import pytest

from omni.config import ConfigError
from omni.train.config import load_stage
from omni.train.lora import check_full_training, target_modules

ROOT = Path(__file__).resolve().parents[2]
ATTN = "lora.targets=[llm.model.layers.*.self_attn.*]"


def _load(*overrides):
    return load_stage(ROOT / "stages/tiny/2_sft.yaml", list(overrides))


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    return str(e.value)


def test_lora_is_off_by_default_and_on_with_a_rank_and_targets():
    assert not _load().lora.enabled
    cfg = _load("lora.rank=8", ATTN, "trainable=[]")  # LoRA alone: no other parameter needs to train
    assert cfg.lora.enabled and cfg.lora.rank == 8 and cfg.trainable == []


def test_bad_lora_sections_name_the_field():
    assert "lora.targets" in _error("lora.rank=8")
    assert "lora.rank is 0" in _error(ATTN)
    assert "lora.dropout" in _error("lora.rank=8", ATTN, "lora.dropout=1.0")
    assert "lora.alpha" in _error("lora.rank=8", ATTN, "lora.alpha=0")
    assert "or set lora.rank" in _error("trainable=[]")
    assert "method sft or dpo" in _error("lora.rank=8", ATTN, "method=rm")


def test_qlora_runs_on_ddp_only():
    assert _load("lora.rank=8", ATTN, "lora.qlora=true").lora.qlora  # bitsandbytes is installed by the test extra
    assert "runs on engine ddp" in _error("lora.rank=8", ATTN, "lora.qlora=true", "engine=fsdp2")
    assert "lora.rank is 0" in _error("lora.qlora=true")


def test_target_globs_pick_linear_layers_by_parameter_name(tiny_model):
    model, _ = tiny_model
    assert target_modules(model, ["llm.model.layers.*.self_attn.q_proj.*"]) == [
        "llm.model.layers.0.self_attn.q_proj", "llm.model.layers.1.self_attn.q_proj"]  # weight and bias: one layer
    with pytest.raises(ConfigError, match=r"\['llm.model.norm.\*'\] match no Linear layer"):
        target_modules(model, ["llm.model.layers.*.self_attn.*", "llm.model.norm.*"])


def test_full_training_inside_an_adapted_layer_is_refused():
    trained = ["projectors.image.linear_1.weight", "llm.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert check_full_training(trained) == ["projectors.image.linear_1.weight"]
    with pytest.raises(ConfigError, match="lora.targets adapts"):
        check_full_training([*trained, "llm.model.layers.0.self_attn.q_proj.base_layer.bias"])

"""The memory planner's accounting, checked against the formulas by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

from omni.model.table import meta_model
from omni.plan import GIB, plan_stage
from omni.train.config import load_stage

ROOT = Path(__file__).resolve().parents[2]


def _rows(plan):
    return {name.split(" ")[0]: gib for name, gib in plan.rows}


def test_fp32_full_training_is_16_bytes_per_parameter_plus_activations():
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml")
    p = sum(x.numel() for x in meta_model("tiny").parameters())
    rows = _rows(plan_stage(cfg, gpus=1, gpu_gib=1, engine="ddp", seq_len=256))
    assert rows["weights"] == pytest.approx(4 * p / GIB)
    assert rows["gradients"] == pytest.approx(4 * p / GIB)
    assert rows["optimizer"] == pytest.approx(8 * p / GIB)  # the fp32 parameters are the master copy


def test_sharding_and_frozen_parts():
    cfg = load_stage(ROOT / "stages/7b/1a_image_projector.yaml")  # only the image projector trains
    model = meta_model("7b")
    total = sum(x.numel() for x in model.parameters())
    proj = sum(x.numel() for x in model.projectors["image"].parameters())
    ddp = _rows(plan_stage(cfg, 8, 80, "ddp", 4096))
    fsdp = _rows(plan_stage(cfg, 8, 80, "fsdp2", 4096))
    assert ddp["weights"] == pytest.approx(4 * total / GIB)           # fp32 as the engines hold them, frozen too
    assert ddp["gradients"] == pytest.approx(4 * proj / GIB)
    assert ddp["optimizer"] == pytest.approx(8 * proj / GIB)          # AdamW moments
    assert fsdp["weights"] == pytest.approx(ddp["weights"] / 8)
    assert fsdp["gradients"] == pytest.approx(ddp["gradients"] / 8)
    # FSDP2 holds the root unit gathered (bf16 policy) plus the running and the prefetched LLM layer
    llm = model.llm
    root = sum(x.numel() for x in [*llm.get_input_embeddings().parameters(), *llm.get_output_embeddings().parameters(),
                                   *llm.model.norm.parameters(), *model.projectors.parameters()])
    layer = sum(x.numel() for x in llm.model.layers[0].parameters())
    assert "gathered" not in ddp
    assert fsdp["gathered"] == pytest.approx(2 * (root + 2 * layer) / GIB)


def test_7b_sft_fits_on_8_h100_with_fsdp2_but_not_with_ddp():
    cfg = load_stage(ROOT / "stages/7b/2_sft.yaml")
    assert plan_stage(cfg, 8, 80, "fsdp2", 4096).fits
    assert not plan_stage(cfg, 8, 80, "ddp", 4096).fits
    no_ckpt = load_stage(ROOT / "stages/7b/2_sft.yaml", ["activation_checkpointing=false"])
    with_ckpt = _rows(plan_stage(cfg, 8, 80, "fsdp2", 4096))
    assert _rows(plan_stage(no_ckpt, 8, 80, "fsdp2", 4096))["activations"] > 3 * with_ckpt["activations"]


def test_bad_engine_is_an_error():
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml")
    with pytest.raises(ValueError, match="engine"):
        plan_stage(cfg, 1, 1, "horovod", 256)

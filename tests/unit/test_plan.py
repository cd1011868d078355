"""The memory planner's accounting, checked against the formulas by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

from omni.config import ConfigError
from omni.model.generate import computes_in_fp32
from omni.model.lm_loss import CHUNK_LOGITS
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


def test_sharding_and_frozen_parts(qwen2_7b):
    cfg = load_stage(ROOT / "stages/7b/1a_image_projector.yaml")  # only the image projector trains
    cfg.model_overrides += qwen2_7b
    model = meta_model("7b", qwen2_7b)
    total = sum(x.numel() for x in model.parameters())
    proj = sum(x.numel() for x in model.projectors["image"].parameters())
    fp32_norms = sum(x.numel() for m in model.modules() if computes_in_fp32(m) for x in m.parameters(recurse=False))
    ddp = _rows(plan_stage(cfg, 8, 80, "ddp", 4096))
    fsdp = _rows(plan_stage(cfg, 8, 80, "fsdp2", 4096))
    zero3 = _rows(plan_stage(cfg, 8, 80, "zero3", 4096))
    # bf16 stage: ddp/fsdp2 hold the frozen parts in bf16 but the towers' fp32 norms; DeepSpeed all in fp32
    assert fp32_norms > 0
    assert ddp["weights"] == pytest.approx((4 * (proj + fp32_norms) + 2 * (total - proj - fp32_norms)) / GIB)
    assert zero3["weights"] == pytest.approx(4 * total / 8 / GIB)
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


def test_7b_sft_fits_on_8_h100_with_fsdp2_but_not_with_ddp(qwen2_7b):
    cfg = load_stage(ROOT / "stages/7b/2_sft.yaml")
    cfg.model_overrides += qwen2_7b
    # a 36,864-token row x 152,064 logits is over the chunking threshold: one chunk's logits and gradient
    assert _rows(plan_stage(cfg, 8, 80, "fsdp2", 4096))["logits"] == pytest.approx(2 * 4 * CHUNK_LOGITS / GIB)
    assert plan_stage(cfg, 8, 80, "fsdp2", 4096).fits
    assert not plan_stage(cfg, 8, 80, "ddp", 4096).fits
    no_ckpt = load_stage(ROOT / "stages/7b/2_sft.yaml", ["activation_checkpointing=false"])
    no_ckpt.model_overrides += qwen2_7b
    with_ckpt = _rows(plan_stage(cfg, 8, 80, "fsdp2", 4096))
    assert _rows(plan_stage(no_ckpt, 8, 80, "fsdp2", 4096))["activations"] > 3 * with_ckpt["activations"]


def test_bad_engine_is_an_error():
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml")
    with pytest.raises(ValueError, match="engine"):
        plan_stage(cfg, 1, 1, "horovod", 256)


def test_a_launch_that_cannot_fit_stops_at_once_with_the_plan(tmp_path, monkeypatch):
    """`omni train` with a device budget (here OMNI_GPU_MEM_GIB; a GPU's own memory on a GPU) refuses a
    stage the plan says cannot fit, before a weight is built or a file written, with what to change."""
    from omni.cli.main import main
    from omni.plan import refuse_if_it_cannot_fit

    monkeypatch.setenv("OMNI_GPU_MEM_GIB", "0.05")
    with pytest.raises(SystemExit) as stopped:
        main(["train", str(ROOT / "stages/tiny/2_sft.yaml"), "--out", str(tmp_path / "run"), "init_from=null",
              "data.manifest=never-read.yaml"])
    message = str(stopped.value.code)
    assert "does not fit" in message and "1 x 0.05 GiB, engine ddp" in message
    assert "does NOT fit in 0.05 GiB" in message and "engine=fsdp2" in message and "torchrun" in message
    assert not (tmp_path / "run").exists()
    # a schedule: its first stage is refused before any stage trains
    with pytest.raises(SystemExit, match="stage stage1-image-projector does not fit"):
        main(["schedule", str(ROOT / "stages/tiny/schedule.yaml"), "--out", str(tmp_path / "sched")])
    assert not (tmp_path / "sched").exists()
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", ["init_from=null"])
    monkeypatch.setenv("OMNI_GPU_MEM_GIB", "80")
    refuse_if_it_cannot_fit(cfg)  # fits: nothing to say
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's processes share the work: the plan is per GPU of 4
    monkeypatch.setenv("OMNI_GPU_MEM_GIB", "0.05")
    with pytest.raises(ConfigError, match="4 x 0.05 GiB"):
        refuse_if_it_cannot_fit(cfg)
    monkeypatch.delenv("OMNI_GPU_MEM_GIB")
    refuse_if_it_cannot_fit(cfg)  # a CPU has no budget to check against; any GPU holds the tiny model


def test_a_packed_row_holds_the_media_of_every_sample_of_the_micro_batch():
    """A packed micro-batch is one LLM row of tokens_per_pack tokens with micro_batch samples in it:
    the towers run all their media. By hand: unpacked, 1 sample of s tokens costs c*s + M (the LLM
    is linear in s without eager scores, M is one sample's media), so M = 2*A(s) - A(2s), and the
    packed micro-batch of 4 costs the LLM's one row plus 4 samples' media."""
    def activations(*overrides, seq_len=256):
        cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", list(overrides))
        return _rows(plan_stage(cfg, 1, 80, "ddp", seq_len))["activations"]

    one, two = activations("batch.micro_batch=1"), activations("batch.micro_batch=1", seq_len=512)
    media = 2 * one - two
    assert media > 0
    packed = activations("batch.micro_batch=4", "batch.tokens_per_pack=256")
    assert packed == pytest.approx(one + 3 * media)
    assert packed > activations("batch.micro_batch=1", "batch.tokens_per_pack=256")

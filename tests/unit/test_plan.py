"""The memory planner's accounting, checked against the formulas by hand."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omni.config import ConfigError
from omni.model.generate import computes_in_fp32
from omni.model.lm_loss import CHUNK_LOGITS
from omni.model.table import meta_model
from omni.plan import GIB, plan_stage
from omni.train.config import load_stage
from omni.train.qlora import NF4_BYTES

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


def test_dpo_plans_pairs_and_its_reference_model():
    """A DPO micro-batch of b pairs runs 2b sequences; its reference (the policy's architecture,
    loaded whole in fp32) is a phase before training with `dpo.precompute_ref`, held next to the
    policy without it, and absent for a reference-free loss. An align config plans like a stage."""
    def plan(*overrides):
        cfg = load_stage(ROOT / "omni/align/configs/tiny_dpo.yaml", ["preset=tiny", "init_from=null", *overrides])
        return plan_stage(cfg, 2, 80, "fsdp2", 128)

    p = sum(x.numel() for x in meta_model("tiny").parameters())
    pre, held, free = plan(), plan("dpo.precompute_ref=false"), plan("dpo.loss_type=simpo")
    sft = plan("method=sft", "dpo.precompute_ref=false")
    assert _rows(pre)["activations"] == pytest.approx(2 * _rows(sft)["activations"])
    assert _rows(pre)["logits"] == pytest.approx(2 * _rows(sft)["logits"])
    assert dict(pre.before)["reference model (fp32, whole)"] == pytest.approx(4 * p / GIB)  # not sharded
    assert "reference" not in _rows(pre) and pre.total == pytest.approx(max(sum(v for _, v in pre.rows),
                                                                            sum(v for _, v in pre.before)))
    assert _rows(held)["reference"] == pytest.approx(4 * p / GIB)
    # the reference's logits of the same rows sit next to the policy's
    forward = lambda plan: sum(v for _, v in plan.rows)  # noqa: E731
    assert forward(held) == pytest.approx(forward(free) + 4 * p / GIB + _rows(held)["logits"])
    assert not free.before and "reference" not in _rows(free)
    assert "before: reference model" in pre.table()


def test_dpo_logits_are_whole_rows_even_where_sft_would_chunk(qwen2_7b):
    """DPO's sequence log-probs read whole fp32 logits (no labels reach the model, so no chunked
    loss): 16 pairs = 32 rows x 4096 tokens x 152,064 vocabulary x 4 bytes, by hand."""
    cfg, sft = (load_stage(ROOT / f"omni/align/configs/tiny_{m}.yaml", ["preset=7b", "init_from=null"])
                for m in ("dpo", "sft"))
    cfg.model_overrides += qwen2_7b
    sft.model_overrides += qwen2_7b
    assert cfg.batch.micro_batch == 16
    plan = plan_stage(cfg, 8, 80, "fsdp2", 4096)
    assert dict(plan.before)["logits (fp32, whole rows)"] == pytest.approx(32 * 4096 * 152064 * 4 / GIB)
    assert _rows(plan_stage(sft, 8, 80, "fsdp2", 4096))["logits"] == pytest.approx(2 * 4 * CHUNK_LOGITS / GIB)


def test_a_frozen_tower_keeps_no_activations():
    """Stage 1a trains the image projector only: pixels need no gradient, so the frozen vision tower
    records nothing for backward. Training the tower too adds its blocks' activations: by hand, 2
    blocks x 64 patches x 128 images (32 samples x 4 video frames) x width 128 x 34 values x 4 bytes."""
    frozen = load_stage(ROOT / "stages/tiny/1a_image_projector.yaml")
    tower = load_stage(ROOT / "stages/tiny/1a_image_projector.yaml",
                       ["trainable=[projectors.image.*, encoders.image.*]"])
    model = meta_model("tiny")
    image = model.encoders["image"]
    assert (image.num_patches, image.out_dim, model.config.video.max_frames) == (64, 128, 4)
    by_hand = 2 * 64 * (32 * 4) * 128 * 34 * 4 / 2
    f = dict(plan_stage(frozen, 1, 80, "ddp", 256).rows)
    t = dict(plan_stage(tower, 1, 80, "ddp", 256).rows)
    (f_label, f_act), = [(k, v) for k, v in f.items() if k.startswith("activations")]
    (t_label, t_act), = [(k, v) for k, v in t.items() if k.startswith("activations")]
    assert " 0 img" in f_label and " 128 img" in t_label
    assert t_act - f_act == pytest.approx(by_hand / GIB)


def test_an_align_config_without_a_model_folder_names_the_preset_to_plan_from():
    from omni.cli.main import main

    with pytest.raises(SystemExit, match="preset=NAME"):
        main(["plan", str(ROOT / "omni/align/configs/tiny_dpo.yaml"), "--gpus", "1"])


def test_media_per_micro_batch_is_what_the_processor_makes_within_the_row():
    """Per sample: its AnyRes tiles (with the thumbnail) or its video's max_frames frames through the
    vision tower, max_windows audio windows through the audio tower; no more than the row's tokens hold."""
    from omni.plan import media_per_micro_batch

    model = meta_model("tiny", ["anyres.max_tiles=4", "video.max_frames=3"])  # 4 tiles + thumbnail = 5 images
    audio = model.encoders["audio"]
    unit = min(model.image_tokens(), model.video_tokens(1))
    window = model.audio_window_tokens(audio.valid_frames(audio.window_samples))
    big = 100 * (unit + window)
    assert media_per_micro_batch(model, 3, 3, big) == (3 * 5, 3 * model.config.audio.max_windows)
    assert media_per_micro_batch(model, 3, 3, big, ("video",)) == (3 * 3, 0)
    assert media_per_micro_batch(model, 3, 3, big, ("audio",)) == (0, 3 * model.config.audio.max_windows)
    assert media_per_micro_batch(model, 3, 3, big, ()) == (0, 0)
    # a packed row of 2 images' tokens holds 2 images and 1 window at most, whatever the samples
    assert media_per_micro_batch(model, 3, 1, 2 * unit + 1, ("image",)) == (2, 0)
    assert media_per_micro_batch(model, 3, 1, window + 1, ("audio",)) == (0, 1)


def test_7b_video_stage_plans_its_frames(qwen2_7b):
    """Stage 1d's packed row (4 samples) holds 4 videos of 48 frames: 192 frames through SigLIP
    (with the tower trained: stage 1d's own frozen tower keeps none)."""
    cfg = load_stage(ROOT / "stages/7b/1d_video.yaml", ["trainable=[projectors.video.*, encoders.image.*]"])
    cfg.model_overrides += qwen2_7b
    model = meta_model("7b", qwen2_7b)
    assert model.config.video.max_frames == 48 and cfg.batch.micro_batch == 4
    assert cfg.batch.tokens_per_pack >= 4 * model.video_tokens(48)  # the row holds all 4 videos
    label = next(name for name, _ in plan_stage(cfg, 8, 80, "fsdp2").rows if name.startswith("activations"))
    assert "192 img" in label


def test_a_stats_file_sets_the_row_length_and_the_media_kinds(tiny_corpus, tmp_path):
    """`omni data stats` on the stage's data: the longest sample of its datasets is the unpacked row,
    and only the media kinds its datasets hold reach the towers."""
    from omni.curate.stats import stats
    from omni.plan import media_per_micro_batch, stats_for_stage

    cfg = load_stage(ROOT / "stages/tiny/1e_audio.yaml", ["batch.micro_batch=4", "init_from=null"])
    result = stats(tiny_corpus, tmp_path / "stats", preset="tiny", split="train", progress=False)
    mine = [d for d in result.datasets if d.name in cfg.data.datasets]
    assert {d.name for d in mine} == set(cfg.data.datasets)
    longest = max(d.maxima["total"] for d in mine)
    kinds = {k for d in mine for mix in d.mix for k in mix.split("+")}
    assert "audio" in kinds and "video" not in kinds
    assert stats_for_stage(cfg, result.json_file) == (longest, tuple(k for k in ("image", "video", "audio")
                                                                     if k in kinds))
    images, windows = media_per_micro_batch(meta_model("tiny"), 4, 4, longest, tuple(kinds))
    label = next(n for n, _ in plan_stage(cfg, 1, 80, "ddp", stats=result.json_file).rows if n.startswith("activ"))
    assert label == f"activations (b=4, {longest} tok, {images} img, {windows} aud)"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="bad.json: not a stats.json of `omni data stats`"):
        plan_stage(cfg, 1, 80, "ddp", stats=bad)
    other = load_stage(ROOT / "stages/tiny/1e_audio.yaml", ["data.datasets={nowhere: 1.0}"])
    with pytest.raises(ConfigError, match="no stats for the stage's datasets \\['nowhere'\\]"):
        plan_stage(other, 1, 80, "ddp", stats=result.json_file)


def test_lora_plans_its_adapters_and_qlora_a_4bit_llm_base():
    """A LoRA stage trains rank x (in + out) parameters per adapted layer; QLoRA holds the LLM's
    Linear weights (the LM head aside) at NF4's ~0.52 bytes instead of fp32."""
    lora = ["trainable=[projectors.image.*]", "lora.rank=4", "lora.targets=[llm.model.layers.*.self_attn.*]"]
    plain = load_stage(ROOT / "stages/tiny/2_sft.yaml", ["trainable=[projectors.image.*]"])
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", lora)
    q = load_stage(ROOT / "stages/tiny/2_sft.yaml", [*lora, "lora.qlora=true"])
    model = meta_model("tiny")
    layers = model.llm.model.layers
    adapters = sum(4 * (m.in_features + m.out_features) for layer in layers
                   for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj))
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if type(m) is torch.nn.Linear)
    base, adapted, quantized = (_rows(plan_stage(c, 1, 1, "ddp", 256)) for c in (plain, cfg, q))
    assert adapted["gradients"] - base["gradients"] == pytest.approx(4 * adapters / GIB)
    assert adapted["weights"] - base["weights"] == pytest.approx(4 * adapters / GIB)
    assert adapted["weights"] - quantized["weights"] == pytest.approx(linear * (4 - NF4_BYTES) / GIB)
    assert quantized["optimizer"] == adapted["optimizer"]


def test_bf16_plans_autocasts_copies_of_the_trainable_matmul_weights():
    """Under bf16, autocast caches a bf16 copy of each fp32 trainable weight a matmul reads and backward
    keeps it: stage 1a on ddp trains the image projector (two Linear layers): 2 bytes per parameter.
    FSDP2's bf16 policy gathers the root (the projectors) in bf16 already: nothing to copy. fp32: none."""
    model = meta_model("tiny")
    proj = model.projectors["image"]
    assert {type(m).__name__ for m in proj.modules() if any(True for _ in m.parameters(recurse=False))} == {"Linear"}
    n = sum(p.numel() for p in proj.parameters())

    def copies(*overrides):
        cfg = load_stage(ROOT / "stages/tiny/1a_image_projector.yaml", list(overrides))
        return dict(plan_stage(cfg, 1, 80, seq_len=64).rows).get("bf16 copies of trainable weights (autocast)")

    assert copies("precision=bf16") == pytest.approx(2 * n / GIB)
    assert copies("precision=bf16", "engine=fsdp2") == 0
    assert copies("precision=fp32") is None


def test_zero2_holds_an_fp32_master_partition_and_its_reduction_buckets():
    """DeepSpeed's ZeRO-2 steps an fp32 clone of its partition (4 bytes per trainable parameter / N)
    and reduces gradients through two buckets of reduce_bucket_size fp32 elements, allocated whole
    on a GPU; on a CPU only the gradients copied into one are resident."""
    from omni.plan import DEEPSPEED_REDUCE_BUCKET

    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", ["engine=deepspeed", "zero_stage=2"])
    p = sum(x.numel() for x in meta_model("tiny").parameters())
    gpu = _rows(plan_stage(cfg, 4, 80, seq_len=64))
    cpu = plan_stage(cfg, 1, 80, seq_len=64, device="cpu")
    assert gpu["master"] == pytest.approx(4 * p / 4 / GIB)
    assert gpu["gradient"] == pytest.approx(2 * 4 * DEEPSPEED_REDUCE_BUCKET / GIB)
    assert _rows(cpu)["gradient"] == pytest.approx(4 * p / GIB)
    assert "master" not in _rows(plan_stage(cfg, 4, 80, "zero3", 64))


def test_a_swiglu_llm_mlp_keeps_2_plus_8r_values_per_token():
    """The LLM's gated MLP keeps its input and four r*h-wide tensors (gate, its SiLU, up, their
    product): widening it from r = 4 to 8 adds 8 * 4 = 32 values per token and hidden unit per
    layer, by hand on tiny 2_sft (2 layers, 32 rows of 256 tokens, h = 128, fp32: 2 x 16 bits)."""
    def llm_activations(intermediate):
        cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", ["activation_checkpointing=false"])
        cfg.model_overrides += [f"llm.hf_config.intermediate_size={intermediate}"]
        return _rows(plan_stage(cfg, 1, 80, "ddp", 256))["activations"]

    assert meta_model("tiny").llm.config.hidden_size == 128
    assert llm_activations(1024) - llm_activations(512) == pytest.approx(2 * 256 * 32 * 128 * 32 * 2 / GIB)

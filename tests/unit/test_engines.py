"""Engine selection, the generated DeepSpeed config, FSDP2 units, FLOPs/MFU, frozen parameters.

Multi-process runs of every engine are in tests/integration/test_distributed.py; here each engine
is set up in this process (a one-member process group) and takes one real optimizer step.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni.align.objectives import sft
from omni.config import ConfigError
from omni.distributed import World
from omni.model.batch import MediaBatch
from omni.model.omni_model import OmniModel
from omni.model.processor import Batch
from omni.presets import build_preset
from omni.train.config import load_stage
from omni.train.engines import build_engine, deepspeed_config, fsdp_units
from omni.train.flops import PEAK_BF16_TFLOPS, FlopCounter, peak_for_gpu, peak_tflops
from omni.train.optim import set_trainable

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "stages/tiny/2_sft.yaml"


def test_engine_and_zero_stage_validation():
    assert load_stage(SFT, ["engine=fsdp2"]).engine == "fsdp2"
    assert load_stage(SFT, ["engine=deepspeed", "zero_stage=3"]).zero_stage == 3
    with pytest.raises(ConfigError, match="engine"):
        load_stage(SFT, ["engine=fsdp"])
    with pytest.raises(ConfigError, match="zero_stage.*2 or 3"):
        load_stage(SFT, ["engine=deepspeed"])
    with pytest.raises(ConfigError, match="zero_stage.*2 or 3"):
        load_stage(SFT, ["engine=deepspeed", "zero_stage=1"])
    with pytest.raises(ConfigError, match="zero_stage.*only engine deepspeed"):
        load_stage(SFT, ["engine=fsdp2", "zero_stage=3"])


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_config_is_generated_from_the_stage(stage, precision):
    cfg = load_stage(SFT, ["engine=deepspeed", f"zero_stage={stage}", f"precision={precision}",
                           "batch.micro_batch=3", "batch.grad_accum=5", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_allow_untested_optimizer"] is True  # omni's AdamW is the client optimizer
    assert "optimizer" not in ds and "scheduler" not in ds
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)
    assert not any(k in ds for k in ("bf16", "fp16"))  # fp32 parameters on every engine
    if precision == "bf16":
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    else:
        assert "torch_autocast" not in ds
    from deepspeed.runtime.config import (
        DeepSpeedConfig,  # DeepSpeed's own parser accepts it (one rank)
    )

    parsed = DeepSpeedConfig(deepspeed_config(cfg, world_size=1))
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 15 and parsed.gradient_clipping == 0.5
    assert parsed.torch_autocast_enabled == (precision == "bf16")


def test_fsdp2_units_are_the_llm_layers_and_tower_blocks(tiny_model):
    model, _ = tiny_model
    layers, towers = fsdp_units(model)
    name = {id(m): n for n, m in model.named_modules()}
    assert [name[id(m)] for m in layers] == [f"llm.model.layers.{i}" for i in range(model.llm.config.num_hidden_layers)]
    tower_names = [name[id(m)] for m in towers]
    assert tower_names[-2:] == ["encoders.image", "encoders.audio"]
    assert any(n.startswith("encoders.image.") for n in tower_names) and \
        any(n.startswith("encoders.audio.") for n in tower_names)
    for i, inner in enumerate(tower_names):  # children come before the unit that holds them
        assert not any(inner.startswith(outer + ".") for outer in tower_names[:i])


def _frozen_and_trainable(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad},
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def one_step_keeps_frozen_weights(engine: str, manifest: str) -> None:
    """Towers frozen, LLM + projectors trainable: one real step in this process; the optimizer
    holds exactly the trainable parameters, frozen weights stay bit-identical, the LLM moves."""
    overrides = [f"data.manifest={manifest}", "init_from=null", "trainable=[llm.*,projectors.*]"]
    overrides += ["engine=deepspeed", f"zero_stage={engine[-1]}"] if engine.startswith("deepspeed") else \
        [f"engine={engine}"]
    cfg = load_stage(SFT, overrides)
    torch.manual_seed(0)
    model, _ = OmniModel.from_config(build_preset("tiny"))
    set_trainable(model, cfg.trainable)
    frozen, trainable = _frozen_and_trainable(model)
    world = World.from_env(need_group=engine != "ddp")
    try:
        eng = build_engine(cfg, world)
        eng.setup(model)
        if engine in ("ddp", "fsdp2"):
            held = [p.numel() for g in eng.optimizer.param_groups for p in g["params"]]
        else:  # ZeRO flattens what it was handed
            groups = getattr(eng.module.optimizer, "bit16_groups", None) or eng.module.optimizer.fp16_groups
            held = [getattr(p, "ds_numel", p.numel()) for g in groups for p in g]
        assert sum(held) == sum(v.numel() for v in trainable.values())
        ids = torch.randint(10, 100, (2, 12))
        batch = Batch(ids, torch.ones_like(ids), ids.clone(), MediaBatch())
        with eng.micro_batch(last=True), eng.autocast():  # no media: towers and projectors run on blank inputs
            loss, _ = sft.SFT(cfg).loss(eng.module, batch, float(ids.numel()), ("image", "video", "audio"))
            eng.backward(loss)
        assert eng.step() > 0
        full = eng.full_state_dict()
        after = full if full is not None else {k: v.detach() for k, v in model.state_dict().items()}
    finally:
        world.close()
    for name, value in frozen.items():
        assert torch.equal(after[name].cpu(), value), name
    assert all(not torch.equal(after[n].cpu(), v) for n, v in trainable.items() if n.startswith("llm."))


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_frozen_modules_stay_out_of_the_optimizer(engine, tiny_corpus):
    one_step_keeps_frozen_weights(engine, str(tiny_corpus))


@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_modules_stay_out_of_the_deepspeed_optimizer(stage, tiny_corpus):
    """A single-process deepspeed.initialize and step. DeepSpeed keeps process-wide groups that a
    second initialise in one process trips over, so each case runs in a fresh interpreter."""
    code = f"from tests.unit.test_engines import one_step_keeps_frozen_weights as f; f('deepspeed{stage}', {str(tiny_corpus)!r})"
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_flops_follow_the_documented_formula():
    model, _ = OmniModel.from_config(build_preset("tiny"))
    llm, cfg = model.llm, model.llm.config
    n_llm = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    lengths = [10, 30]
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * (10 ** 2 + 30 ** 2)
    counter = FlopCounter(model)
    assert counter(lengths, None) == 6 * n_llm * 40 + attention  # PaLM: 6N per token + attention
    for p in model.encoders.parameters():  # frozen towers: forward only
        p.requires_grad_(False)
    from omni.model.batch import MediaBatch

    tower = model.encoders["image"]
    n_tower = sum(p.numel() for p in tower.parameters())
    n_proj = sum(p.numel() for p in model.projectors["image"].parameters())
    seq, blocks = tower.num_patches, 2
    media = MediaBatch(image=torch.zeros(3, 3, tower.image_size, tower.image_size), image_tiles=[1, 2])
    expected_image = (2 * n_tower * 3 * seq + 4 * blocks * tower.out_dim * 3 * seq * seq  # tower forward
                      + 4 * n_proj * 3 * model.image_tokens())  # projector: forward + weight gradients, none to the tower
    assert FlopCounter(model)(lengths, media) == 6 * n_llm * 40 + attention + expected_image
    for p in model.parameters():  # only a projector trains: the LLM still back-propagates to it
        p.requires_grad_(False)
    for p in model.projectors.parameters():
        p.requires_grad_(True)
    assert FlopCounter(model)(lengths, None) == 4 * n_llm * 40 + attention


def test_peak_flops_table_and_configured_peak():
    assert peak_for_gpu("NVIDIA H100 80GB HBM3") == 989
    assert peak_for_gpu("NVIDIA H100 PCIe") == 756
    assert peak_for_gpu("NVIDIA A100-SXM4-80GB") == 312
    assert peak_for_gpu("NVIDIA H200") == 989
    assert peak_for_gpu("NVIDIA L40S") == 362 and peak_for_gpu("NVIDIA L4") == 121
    assert peak_for_gpu("Some Future GPU") is None
    assert all(v > 0 for _, v in PEAK_BF16_TFLOPS)
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "bf16") is None  # CPU: tokens/s only
    assert peak_tflops(cpu, "fp32", configured=2.5) == 2.5


def test_every_7b_stage_fits_8_gpus_of_80_gib_on_its_own_engine(qwen2_7b):
    from omni.plan import plan_stage
    from omni.train.engines import stage_layout

    for path in sorted((ROOT / "stages/7b").glob("[12]*.yaml")):
        cfg = load_stage(path)
        cfg.model_overrides += qwen2_7b  # Qwen2-7B's config.json, without the hub
        assert cfg.engine in ("fsdp2", "deepspeed") and stage_layout(cfg) in ("fsdp2", "zero3"), path.name
        plan = plan_stage(cfg, gpus=8, gpu_gib=80)  # the stage's own engine
        assert plan.fits, f"{path.name}:\n{plan.table()}"
    assert stage_layout(load_stage(SFT, ["engine=deepspeed", "zero_stage=2"])) == "zero2"


def test_a_skeleton_is_the_architecture_without_reading_weights(tiny_model, tmp_path):
    """What FSDP2's ranks other than 0 build (`init_model(skeleton=True)`): every parameter and buffer
    of the real model, by name and shape, on the meta device, and no weights file is read (from a
    stage folder, an export, or the preset)."""
    from omni.export.writer import export_model
    from omni.train.trainer import init_model

    model, tok = tiny_model
    model.save_pretrained(tmp_path / "stage", tok)
    export_model(tmp_path / "stage", tmp_path / "export")
    for weights in [tmp_path / "stage/model.safetensors", *(tmp_path / "export").glob("*.safetensors")]:
        weights.write_bytes(b"not read")
    for override in ([f"init_from={tmp_path}/stage"], [f"init_from={tmp_path}/export"], ["init_from=null"]):
        cfg = load_stage(SFT, [f"data.manifest={tmp_path}/m.yaml", *override])
        skeleton, _ = init_model(cfg, skeleton=True)
        real = dict(model.named_parameters()) | dict(model.named_buffers())
        built = dict(skeleton.named_parameters()) | dict(skeleton.named_buffers())
        assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in real.items()}
        assert all(v.is_meta for v in built.values())


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_bf16_stage_holds_frozen_parts_in_bf16_and_trains(engine, tiny_corpus):
    """Towers frozen under `precision: bf16`: their weights are bf16 (but whisper's / open_clip's
    fp32 norms), the trainable LLM and projectors stay fp32 and learn, media still run."""
    cfg = load_stage(SFT, [f"data.manifest={tiny_corpus}", "init_from=null", "trainable=[llm.*,projectors.*]",
                           f"engine={engine}", "precision=bf16"])
    torch.manual_seed(0)
    model, _ = OmniModel.from_config(build_preset("tiny"))
    set_trainable(model, cfg.trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    world = World.from_env(need_group=engine != "ddp")
    try:
        _bf16_step(cfg, world, model, before)
    finally:
        world.close()


def _bf16_step(cfg, world, model, before):
    from omni.model.generate import computes_in_fp32

    eng = build_engine(cfg, world)
    eng.setup(model)
    fp32_norms = {f"{m}.{n}" for m, mod in model.named_modules() if computes_in_fp32(mod)
                  for n, _ in mod.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        want = torch.float32 if p.requires_grad or name in fp32_norms else torch.bfloat16
        assert p.dtype == want, name
    assert fp32_norms and any(n.startswith("encoders.") and p.dtype == torch.bfloat16 for n, p in model.named_parameters())
    ids = torch.randint(10, 100, (2, 12))
    batch = Batch(ids, torch.ones_like(ids), ids.clone(), MediaBatch())
    with eng.micro_batch(last=True), eng.autocast():  # every tower and projector runs, on blank inputs
        loss, _ = sft.SFT(cfg).loss(eng.module, batch, float(ids.numel()), ("image", "video", "audio"))
        eng.backward(loss)
    assert eng.step() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    after = eng.full_state_dict() or {n: p.detach() for n, p in model.named_parameters()}
    assert all(not torch.equal(after[n].cpu(), v) for n, v in before.items() if n.startswith("llm."))

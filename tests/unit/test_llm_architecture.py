"""One source of truth for the LLM's architecture: rank 0 (weights), the other ranks' meta-device
skeletons and `omni plan` all derive it from `llm.pretrained`'s own config.json, on a tiny local
checkpoint folder the test writes (no hub)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omni.config import ConfigError
from omni.model.architecture import disagreements, summary

ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Qwen2 checkpoint saved in bf16 (as published checkpoints are), with a tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omni.tiny_world import vocabulary
    from omni.tokenizer import build_wordlevel_tokenizer

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SIZES)).to(torch.bfloat16).save_pretrained(folder)
    build_wordlevel_tokenizer(vocabulary()).save_pretrained(folder)
    return folder


def _stage(overrides: list[str]):
    from omni.train.config import load_stage

    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", ["init_from=null", "engine=fsdp2"])
    cfg.model_overrides = overrides
    return cfg


def test_rank0_the_skeletons_and_the_planner_build_llm_pretrained(checkpoint):
    """Today's code built the skeleton and the plan from `llm.hf_config` whatever `llm.pretrained` said."""
    from omni.plan import stage_meta_model
    from omni.train.trainer import init_model

    cfg = _stage([f"llm.pretrained={checkpoint}", "llm.hf_config={}"])
    rank0, _ = init_model(cfg)
    skeleton, _ = init_model(cfg, skeleton=True)
    planned = stage_meta_model(cfg)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert summary(skeleton) == summary(rank0) == summary(planned)
    assert disagreements([summary(rank0), summary(skeleton), summary(planned)]) == []
    assert (rank0.llm.config.hidden_size, rank0.llm.config.num_hidden_layers) == (64, 1)
    assert {p.dtype for p in skeleton.parameters()} == {torch.float32}  # the checkpoint is bf16; omni trains fp32
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()["lm_head.weight"]
    assert torch.equal(rank0.llm.lm_head.weight, saved.float())


def test_changing_llm_pretrained_alone_changes_the_7b_architecture_and_tokenizer(checkpoint):
    from omni.model.table import meta_model
    from omni.presets import build_preset

    cfg = build_preset("7b", [f"llm.pretrained={checkpoint}"])
    assert cfg.tokenizer == str(checkpoint)   # a preset names its tokenizer with its LLM
    llm = meta_model("7b", [f"llm.pretrained={checkpoint}"]).llm
    assert (llm.config.hidden_size, llm.config.vocab_size, llm.config.max_position_embeddings) == (64, 96, 256)


def test_hf_config_that_contradicts_the_checkpoint_is_an_error_on_every_path(checkpoint):
    """The tiny preset's random-init sizes next to another checkpoint: refused, not half-applied."""
    from omni.plan import stage_meta_model
    from omni.train.trainer import init_model

    cfg = _stage([f"llm.pretrained={checkpoint}"])
    for build in (lambda: init_model(cfg), lambda: init_model(cfg, skeleton=True), lambda: stage_meta_model(cfg)):
        with pytest.raises(ConfigError, match=r"hidden_size: 128 vs 64"):
            build()
    agreeing = _stage([f"llm.pretrained={checkpoint}", "llm.hf_config={hidden_size: 64, model_type: qwen2}"])
    assert stage_meta_model(agreeing).llm.config.hidden_size == 64


def test_an_unreadable_llm_and_a_random_init_without_config_are_one_clear_error(tmp_path):
    from omni.model.table import meta_model
    from omni.presets import build_preset

    with pytest.raises(ConfigError, match="cannot read its config.json"):
        meta_model("7b", [f"llm.pretrained={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="model_type"):
        meta_model("tiny", ["llm.hf_config={}"])
    with pytest.raises(ConfigError, match="tokenizer"):
        build_preset("7b", ["llm.pretrained=null"])


def test_ranks_that_built_different_models_are_named():
    from omni.model.table import meta_model

    ours = summary(meta_model("tiny"))
    other = summary(meta_model("tiny", ["llm.hf_config.num_hidden_layers=1"]))
    lines = disagreements([ours, ours, other])
    assert len(lines) == 1 and lines[0].startswith("rank 2: LLM config")
    assert "num_hidden_layers: 1 (rank 0: 2)" in lines[0]
    towers = summary(meta_model("tiny", ["image.vision_cfg.layers=1"]))
    assert disagreements([ours, towers]) == ["rank 1: parameter names, shapes or dtypes"]


class _LLMOnly(torch.nn.Module):
    def __init__(self, llm):
        super().__init__()
        self.llm = llm


def _rank(rank: int, port: int, out: str) -> None:
    """One torchrun-like rank, light to import: the LLM part of a model is what ranks compare first."""
    import os

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omni.distributed import World
    from omni.model.architecture import check_same_model

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    world = World.from_env()
    # rank 1 found another config for the same name (another node's cache, another local folder)
    with torch.device("meta"):
        model = _LLMOnly(Qwen2ForCausalLM(Qwen2Config(**{**SIZES, "intermediate_size": 96 + 32 * rank})))
    try:
        check_same_model(world, model)
        Path(out, str(rank)).write_text("passed")
    except ConfigError as e:
        Path(out, str(rank)).write_text(str(e))
    finally:
        world.close()


def test_every_rank_stops_when_one_built_another_model(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        said = (tmp_path / str(rank)).read_text()
        assert said.startswith("ranks built different models") and "intermediate_size: 128 (rank 0: 96)" in said

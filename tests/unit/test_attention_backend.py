"""The attention backend follows the dtype the forward runs in: FlashAttention-2 (fp16/bf16 only) is
never picked for an fp32 forward, and asking for it where it cannot run is a ConfigError that says
what to change, raised before any forward (a stage, the DPO reference)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omni.config import ConfigError
from omni.model import omni_model
from omni.model.omni_model import OmniModel, attention_backend
from omni.presets import build_preset
from omni.train.config import load_stage
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def flash_attn(monkeypatch):
    """Whether flash-attn counts as installed (it is not on the CPU test machine)."""
    def set_installed(installed: bool) -> None:
        monkeypatch.setattr(omni_model, "flash_attn_installed", lambda: installed)
    return set_installed


def test_auto_picks_flash_attention_2_only_for_half_precision_on_a_gpu_with_flash_attn(flash_attn):
    flash_attn(True)
    assert attention_backend("auto", torch.bfloat16, CUDA) == "flash_attention_2"
    assert attention_backend("auto", torch.float16, "cuda:0") == "flash_attention_2"
    assert attention_backend("auto", torch.float32, CUDA) == "sdpa_varlen"  # an fp32 stage, the fp32 generator
    assert attention_backend("auto", torch.bfloat16, CPU) == "sdpa_varlen"
    assert attention_backend("auto") == "sdpa_varlen"  # while building: dtype and device not known yet
    flash_attn(False)
    assert attention_backend("auto", torch.bfloat16, CUDA) == "sdpa_varlen"


def test_sdpa_and_eager_run_in_any_dtype_anywhere():
    for name in ("sdpa_varlen", "sdpa", "eager"):
        for dtype, device in ((torch.float32, CPU), (torch.bfloat16, CUDA), (None, None)):
            assert attention_backend(name, dtype, device) == name


def test_impossible_flash_attention_2_is_a_config_error_that_says_what_to_change(flash_attn):
    flash_attn(True)
    assert attention_backend("flash_attention_2", torch.bfloat16, CUDA) == "flash_attention_2"
    assert attention_backend("flash_attention_2") == "sdpa_varlen"  # built in fp32 first, switched once known
    with pytest.raises(ConfigError, match=r"runs in torch.float32; run it in bf16 .*llm.attn_implementation: auto"):
        attention_backend("flash_attention_2", torch.float32, CUDA)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        attention_backend("flash_attention_2", torch.bfloat16, CPU)
    flash_attn(False)
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        attention_backend("flash_attention_2", torch.bfloat16, CUDA)
    with pytest.raises(ConfigError, match="'flash_attention_3' is not one of"):
        attention_backend("flash_attention_3", torch.bfloat16, CUDA)


def test_use_attention_switches_the_llm_and_keeps_the_logits():
    torch.manual_seed(0)
    model, tok = OmniModel.from_config(build_preset("tiny", ["llm.attn_implementation=eager"]))
    model.eval()
    ids = tok(["what is two plus three?", "which note is played?"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        assert model.use_attention(torch.float32, CPU) == "eager" == model.llm.config._attn_implementation
        eager = model(ids).logits
        model.config.llm.attn_implementation = "auto"
        assert model.use_attention(torch.float32, CPU) == "sdpa_varlen" == model.llm.config._attn_implementation
        torch.testing.assert_close(model(ids).logits, eager, atol=1e-5, rtol=1e-5)


def test_a_stage_asking_flash_attention_2_in_fp32_stops_before_training(tmp_path):
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml",
                     ["init_from=null", "model_overrides=[llm.attn_implementation=flash_attention_2]"])
    assert cfg.precision == "fp32"
    with pytest.raises(ConfigError, match="flash_attention_2 computes in fp16/bf16"):
        train_stage(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_the_dpo_reference_scores_in_the_stage_precision(tmp_path):
    """The reference pre-compute runs outside the engine's autocast; it scores in the dtype its
    backend was chosen for (bf16 under a bf16 stage), as the policy's forwards do."""
    from omni.align.objectives import OBJECTIVES
    from omni.align.objectives.pairs import pair_batch, policy_logps
    from omni.align.synth import AlignSynthConfig, write_align_corpus
    from omni.data.records import read_records
    from omni.distributed import World
    from omni.model.load import load_model
    from omni.model.processor import OmniProcessor

    write_align_corpus(AlignSynthConfig(out_dir=str(tmp_path), sft_train=1, pref_train=4, val=1, pas_train=1))
    cfg = load_stage(ROOT / "omni/align/configs/tiny_dpo.yaml",
                     [f"init_from={tmp_path}/base", f"data.records={tmp_path}/pref_train.jsonl", "precision=bf16"])
    train = read_records(tmp_path / "pref_train.jsonl")
    model, tok = load_model(cfg.init_from)
    dpo = OBJECTIVES["dpo"](cfg)
    dpo.prepare(model, tok, OmniProcessor.from_config(model.config, tok, model.token_ids), tmp_path, train, [],
                World.from_env())
    made = [dpo.make(r) for r in train]
    pairs = pair_batch(made, tok.pad_token_id)[0].batch
    reference, _ = load_model(cfg.init_from)
    reference.eval()
    with torch.no_grad():
        fp32 = policy_logps(reference, pairs)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = policy_logps(reference, pairs)[0]
    table = torch.cat([torch.stack([dpo.ref_table[w][0] for w, _, _ in made]),
                       torch.stack([dpo.ref_table[w][1] for w, _, _ in made])])
    torch.testing.assert_close(table, bf16, atol=0, rtol=0)
    assert not torch.allclose(table, fp32, atol=1e-4)

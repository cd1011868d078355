"""QLoRA (`lora.qlora: true`) on a trained tiny model, for real: bitsandbytes' 4-bit NF4 layers hold
the LLM's base weights under the adapters (bitsandbytes runs them on CPU too). The checkpoint leaves
the 4-bit base out (a resume quantises init_from again), a stopped run resumes to the same adapter,
the merged `final/` computes what the 4-bit adapter model computed, and `omni consolidate` turns a
LoRA or QLoRA checkpoint into that merged model (a checkpoint with adapter names is not a model
folder: chat, eval and export say to consolidate it first)."""
from __future__ import annotations

import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from omni.config import ConfigError
from omni.model.load import load_model
from omni.train.consolidate import consolidate
from omni.train.config import load_stage
from omni.train.lora import ADAPTER_NAME, PEFT_PREFIX, apply_lora
from omni.train.qlora import is_4bit, quantize_base, quantized_keys
from tests.integration.test_lora import LORA, _inputs
from tests.integration.test_lora_engines import STAGE, _same_final, _stopped_copy, _train

CKPT = "checkpoints/step-00000001"  # the last step writes final/, not a checkpoint


@pytest.fixture(scope="module")
def runs(tiny_corpus, trained_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    return {q: _train(root / f"qlora-{q}", tiny_corpus, trained_tiny, "ddp", 1, f"lora.qlora={q}")
            for q in ("true", "false")}


def test_the_checkpoint_holds_the_adapters_but_not_the_4bit_base(runs, trained_tiny):
    saved = load_file(runs["true"].parent / CKPT / "model.safetensors")
    q = "llm.model.layers.0.self_attn.q_proj"
    assert f"{q}.lora_A.default.weight" in saved and f"{q}.base_layer.bias" in saved
    assert f"{q}.base_layer.weight" not in saved and not any(".absmax" in k for k in saved)
    assert "llm.model.layers.0.mlp.up_proj.base_layer.weight" not in saved  # adapted: 4-bit base, not written
    merged, base = load_file(runs["true"] / "model.safetensors"), load_file(trained_tiny / "model.safetensors")
    assert merged.keys() == base.keys()  # plain names: the adapters merged into the dequantised base
    assert torch.equal(merged["llm.lm_head.weight"], base["llm.lm_head.weight"])  # the head is never quantised
    assert torch.equal(merged["llm.model.embed_tokens.weight"], base["llm.model.embed_tokens.weight"])


def _live(trained_tiny, qlora: str):
    """The adapter model the stage trains (4-bit base with qlora), weights not yet loaded."""
    cfg = load_stage(STAGE, [f"init_from={trained_tiny}", *LORA, f"lora.qlora={qlora}"])
    live, _ = load_model(trained_tiny)
    if qlora == "true":
        assert quantize_base(live, torch.float32) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    apply_lora(live, cfg.lora)
    return live.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(batch.input_ids, batch.attention_mask, media=batch.media).logits


def test_the_merged_final_computes_what_the_4bit_adapter_model_computed(runs, trained_tiny):
    live = _live(trained_tiny, "true")
    adapter = load_file(runs["true"] / "adapter/adapter_model.safetensors")  # the last step's adapters
    set_peft_model_state_dict(live, {k.removeprefix(PEFT_PREFIX): v for k, v in adapter.items()},
                              adapter_name=ADAPTER_NAME)
    merged, _ = load_model(runs["true"])
    batch = _inputs(runs["true"])
    torch.testing.assert_close(_logits(live, batch), _logits(merged, batch), rtol=0, atol=1e-4)
    # an eval-mode forward left the 4-bit weights in the layout the merge reads (bitsandbytes would
    # repack them for its bf16 CPU kernel on an avx512_bf16 machine, ~1e-2 off)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in live.modules() if is_4bit(m))
    plain, _ = load_model(trained_tiny)  # and not the base's: the adapters moved it
    assert (_logits(plain, batch) - _logits(merged, batch)).abs().max() > 1e-3


def test_a_stopped_qlora_run_resumes_to_the_same_adapter(runs, tiny_corpus, trained_tiny, tmp_path):
    _stopped_copy(runs["true"].parent, tmp_path / "run")
    resumed = _train(tmp_path / "run", tiny_corpus, trained_tiny, "ddp", 1, "lora.qlora=true")
    _same_final(resumed, runs["true"], atol=1e-6)


@pytest.mark.parametrize("qlora", ["true", "false"])
def test_a_lora_checkpoint_is_consolidated_into_the_merged_model(runs, trained_tiny, qlora, tmp_path):
    ckpt = runs[qlora].parent / CKPT
    with pytest.raises(ConfigError, match="LoRA stage's checkpoint.*omni consolidate"):
        load_model(ckpt)
    merged, _ = load_model(consolidate(ckpt, tmp_path / "merged"))  # a model folder chat, eval, export read
    live = _live(trained_tiny, qlora)
    live.load_weights(ckpt, absent=quantized_keys(live))  # as a resume reads it
    batch = _inputs(runs[qlora])
    torch.testing.assert_close(_logits(live, batch), _logits(merged, batch), rtol=0, atol=1e-4)


def test_qlora_on_a_sharding_engine_says_what_to_do(trained_tiny):
    for engine in ("fsdp2", "deepspeed"):
        with pytest.raises(ConfigError, match=f"runs on engine ddp.*not {engine}"):
            load_stage(STAGE, [f"init_from={trained_tiny}", f"engine={engine}", "lora.rank=4", "lora.qlora=true",
                               "lora.targets=[llm.model.layers.*.self_attn.*]"])

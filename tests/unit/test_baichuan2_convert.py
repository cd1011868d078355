"""Baichuan-2 checkpoints (fused W_pack, NormHead) into the LLM slot, on a tiny checkpoint written
in that layout and checked against a reference forward that follows Baichuan 2's modeling code."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from omni.config import ConfigError
from omni.export.baichuan2 import convert_baichuan2
from omni.hf.baichuan2_convert import load_baichuan2_as_llama
from omni.model.baichuan2 import NormHead

CFG = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 64,
       "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
       "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
       "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}


def _baichuan2_state(cfg: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    state = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": 1 + r(h),
             "lm_head.weight": r(v, h) * 3}  # raw NormHead rows, far from unit norm
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        state |= {p + "self_attn.W_pack.weight": r(3 * h, h), p + "self_attn.o_proj.weight": r(h, h),
                  p + "mlp.gate_proj.weight": r(i, h), p + "mlp.up_proj.weight": r(i, h),
                  p + "mlp.down_proj.weight": r(h, i), p + "input_layernorm.weight": 1 + r(h),
                  p + "post_attention_layernorm.weight": 1 + r(h)}
    return state


def _reference_logits(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Baichuan2-7B's forward (modeling_baichuan.py, eval mode): W_pack split by
    unflatten(-1, (3, H)), RoPE base 10000 with rotate_half, causal softmax attention, RMSNorm,
    SiLU-gated MLP, NormHead = linear(h, normalize(W))."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps = h // nh, cfg["rms_norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat((-x[..., hd // 2:], x[..., : hd // 2]), dim=-1)

    b, t = ids.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(t).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    x = state["model.embed_tokens.weight"][ids]
    causal = torch.full((t, t), float("-inf")).triu(1)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        y = rms(x, state[p + "input_layernorm.weight"])
        proj = F.linear(y, state[p + "self_attn.W_pack.weight"])
        proj = proj.unflatten(-1, (3, h)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        q, k, v = (proj[j].view(b, t, nh, hd).transpose(1, 2) for j in range(3))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = (q @ k.transpose(2, 3) / math.sqrt(hd) + causal).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(b, t, h), state[p + "self_attn.o_proj.weight"])
        y = rms(x, state[p + "post_attention_layernorm.weight"])
        mlp = F.silu(F.linear(y, state[p + "mlp.gate_proj.weight"])) * F.linear(y, state[p + "mlp.up_proj.weight"])
        x = x + F.linear(mlp, state[p + "mlp.down_proj.weight"])
    x = rms(x, state["model.norm.weight"])
    return F.linear(x, F.normalize(state["lm_head.weight"]))


@pytest.fixture()
def baichuan_dir(tmp_path):
    src = tmp_path / "baichuan2-tiny"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CFG))
    state = _baichuan2_state(CFG)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src, state


def test_converted_llama_with_norm_head_equals_the_baichuan2_forward(baichuan_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src, state = baichuan_dir
    overrides = convert_baichuan2(src, tmp_path / "llama")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    assert type(llm).__name__ == "LlamaForCausalLM"
    h = CFG["hidden_size"]
    w_pack = state["model.layers.1.self_attn.W_pack.weight"]
    assert torch.equal(llm.model.layers[1].self_attn.k_proj.weight, w_pack[h: 2 * h])
    llm.set_output_embeddings(NormHead.from_linear(llm.get_output_embeddings()))
    ids = torch.randint(3, CFG["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = llm(ids).logits, _reference_logits(state, CFG, ids)
    diff = (ours - ref).abs().max().item()
    print(f"Baichuan 2 reference vs converted Llama + NormHead: max abs logits diff {diff:.2e}")
    assert diff <= 1e-5
    assert overrides[:2] == [f"llm.pretrained={tmp_path / 'llama'}", "llm.norm_head=true"]


def test_converted_checkpoint_fills_the_omni_llm_slot(baichuan_dir, tmp_path):
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    src, state = baichuan_dir
    overrides = convert_baichuan2(src, tmp_path / "llama")
    model, _ = OmniModel.from_config(build_preset("tiny", overrides))
    model.eval()
    assert model.config.llm.norm_head and isinstance(model.llm.get_output_embeddings(), NormHead)
    assert model.config.llm.hf_config["model_type"] == "llama"
    ids = torch.randint(7, 60, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _reference_logits(state, CFG, ids), atol=1e-5, rtol=0)


def test_the_converted_folder_has_no_tokenizer_and_says_so(baichuan_dir, tmp_path):
    """Baichuan 2's tokenizer is remote code: the route needs a named tokenizer, and without one the
    model config's default (the LLM's own) fails with one line saying what to do."""
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    src, _ = baichuan_dir
    overrides = convert_baichuan2(src, tmp_path / "llama")
    assert not list((tmp_path / "llama").glob("tokenizer*"))
    cfg = build_preset("tiny", [*overrides, "tokenizer=null"])  # null: the LLM's own, like the 7B preset
    with pytest.raises(ConfigError, match=r"tokenizer .*llama: cannot load a transformers tokenizer"):
        OmniModel.from_config(cfg)


def test_unconvertible_layouts_are_refused(baichuan_dir, tmp_path):
    src, state = baichuan_dir
    alibi = dict(CFG)
    del alibi["max_position_embeddings"]  # Baichuan2-13B: ALiBi, no RoPE
    (src / "config.json").write_text(json.dumps(alibi))
    with pytest.raises(ConfigError, match="ALiBi"):
        load_baichuan2_as_llama(src)
    (src / "config.json").write_text(json.dumps(CFG))
    save_file({**state, "model.layers.0.self_attn.extra.weight": torch.zeros(1)}, str(src / "model.safetensors"))
    with pytest.raises(ConfigError, match="no Baichuan 2 mapping"):
        load_baichuan2_as_llama(src)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ConfigError, match="never unpickles"):
        load_baichuan2_as_llama(src)


def test_a_truncated_checkpoint_is_refused_naming_the_file(baichuan_dir):
    src, _ = baichuan_dir
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=f"{weights}: not a readable safetensors file"):
        load_baichuan2_as_llama(src)

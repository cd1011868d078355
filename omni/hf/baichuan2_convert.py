"""Baichuan-2-style LLM checkpoints -> the omni LLM slot (a transformers Llama + NormHead).

Baichuan 2 (7B, RoPE) is a Llama-architecture decoder with two differences in its checkpoint:
the attention's q/k/v projections are one fused `W_pack` matrix, and the output head is a
NormHead (rows L2-normalised at use; the checkpoint stores the raw weight). Its modeling code is
remote code (`BaichuanForCausalLM`), so omni converts the weights into transformers'
`LlamaForCausalLM` layout and turns on omni's own NormHead (`llm.norm_head=true`,
omni/model/baichuan2.py), which computes the same `h @ normalize(W).T`.

Key mapping (i = layer index, H = hidden_size; every other key is copied unchanged):

| Baichuan 2                                   | Llama (omni: under `llm.`)                          |
|----------------------------------------------|-----------------------------------------------------|
| model.embed_tokens.weight                    | model.embed_tokens.weight                           |
| model.layers.i.self_attn.W_pack.weight [3H,H] | model.layers.i.self_attn.q_proj.weight = rows [0, H) |
|                                              | model.layers.i.self_attn.k_proj.weight = rows [H, 2H) |
|                                              | model.layers.i.self_attn.v_proj.weight = rows [2H, 3H) |
| model.layers.i.self_attn.o_proj.weight       | model.layers.i.self_attn.o_proj.weight              |
| model.layers.i.mlp.{gate,up,down}_proj.weight | model.layers.i.mlp.{gate,up,down}_proj.weight      |
| model.layers.i.{input,post_attention}_layernorm.weight | same                                      |
| model.norm.weight                            | model.norm.weight                                   |
| lm_head.weight (NormHead, raw rows)          | lm_head.weight (raw; omni's NormHead normalises)    |
| model.layers.i.self_attn.rotary_emb.inv_freq (old files) | dropped (recomputed from rope_theta)    |

The row split follows Baichuan's own `W_pack(x).unflatten(-1, (3, H))`: q, k, v in that order,
each H rows, heads contiguous inside each (so the usual `view(..., heads, head_dim)` applies).
Config: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads (= key/value
heads), vocab_size, rms_norm_eps, max_position_embeddings, hidden_act, bos/eos/pad ids carry
over; rope_theta = 10000 (Baichuan 2's RoPE base); no attention or MLP biases; untied head.

Baichuan2-13B uses ALiBi position biases instead of RoPE, which Llama cannot express; its
config has no `max_position_embeddings` and conversion refuses it. Weights are read from
safetensors only: convert a `pytorch_model.bin` first (e.g. `safetensors.torch.save_file` of
`torch.load(path, weights_only=True)`) if you trust its source.

This module converts keys, weights and config only; `python -m omni.export.baichuan2 SRC OUT`
writes the converted transformers Llama folder. Not the tokenizer: Baichuan 2's is remote code
(`trust_remote_code`), which omni never runs; name a transformers-loadable tokenizer with the same
vocabulary in the model config's `tokenizer` (docs/decisions.md).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from omni.config import ConfigError

ROPE_THETA = 10000.0
_COPY = re.compile(r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
                   r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.(gate|up|down)_proj|"
                   r"input_layernorm|post_attention_layernorm)\.weight)$")
_W_PACK = re.compile(r"^model\.layers\.(\d+)\.self_attn\.W_pack\.weight$")
_DROP = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def llama_config_from_baichuan2(cfg: dict):
    """The LlamaConfig with Baichuan 2's sizes (see the module docstring)."""
    from transformers import LlamaConfig

    if cfg.get("max_position_embeddings") is None:
        raise ConfigError("Baichuan 2 config has no max_position_embeddings: this is the ALiBi layout "
                          "(Baichuan2-13B), which a Llama/RoPE model cannot reproduce; only 7B-style RoPE "
                          "checkpoints convert")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in cfg]
    if missing:
        raise ConfigError(f"Baichuan 2 config lacks {missing}")
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        initializer_range=cfg.get("initializer_range", 0.02), tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )


def baichuan2_to_llama_state_dict(state: dict[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """Rename/split every key (the table above); unknown keys are an error."""
    out, unknown = {}, []
    for key, value in state.items():
        if m := _W_PACK.match(key):
            if value.shape[0] != 3 * hidden_size:
                raise ConfigError(f"{key}: expected {3 * hidden_size} rows (q, k, v of {hidden_size}), "
                                  f"got {tuple(value.shape)}")
            q, k, v = value.unflatten(0, (3, hidden_size)).unbind(0)
            prefix = f"model.layers.{m.group(1)}.self_attn."
            out[prefix + "q_proj.weight"] = q.clone()
            out[prefix + "k_proj.weight"] = k.clone()
            out[prefix + "v_proj.weight"] = v.clone()
        elif _COPY.match(key):
            out[key] = value
        elif not _DROP.match(key):
            unknown.append(key)
    if unknown:
        raise ConfigError(f"no Baichuan 2 mapping for {len(unknown)} key(s), e.g. {unknown[:5]}")
    return out


def _read_safetensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in src.glob("*.bin"))
        raise ConfigError(f"{src}: no safetensors weights" + (
            f" (found {pickles}: convert them to safetensors first; omni never unpickles weights)" if pickles else ""))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(src / name)))
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a missing, torn or forged file
            raise ConfigError(f"{src / name}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return state


def load_baichuan2_as_llama(src: str | Path):
    """(LlamaConfig, Llama state dict) of a Baichuan-2-style checkpoint folder."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src}: no config.json; expected a Baichuan 2 checkpoint folder")
    cfg = json.loads((src / "config.json").read_text())
    llama_cfg = llama_config_from_baichuan2(cfg)
    state = baichuan2_to_llama_state_dict(_read_safetensors(src), llama_cfg.hidden_size)
    return llama_cfg, state


def llm_overrides(out: str | Path) -> list[str]:
    """Model overrides (preset or stage `model_overrides`) that put the converted LM in the LLM slot:
    its architecture is the converted folder's config.json (omni/model/architecture.py), so the
    preset's random-init `llm.hf_config` is cleared rather than copied."""
    return [f"llm.pretrained={out}", "llm.norm_head=true", "llm.hf_config={}"]

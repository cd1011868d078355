"""The export follows the transformers conventions vLLM's Transformers backend relies on, checked with
transformers alone (docs/serving.md): `auto_map.AutoModel`, `_supports_attention_backend`, the LLM's
attention called through `ALL_ATTENTION_FUNCTIONS` in every layer, and the keyword arguments of the
top-level forward passed down to that attention function; the tensor-parallel plan reaches the top model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from omni.export.writer import export_model
from omni.model.load import save_model_dir

CALLS: list[tuple[int, dict]] = []


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA that records which layer called it with which keyword arguments (as vLLM's own function
    reads `module.layer_idx` and its `attention_instances` keyword)."""
    CALLS.append((module.layer_idx, kwargs))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("recording", recording_attention)


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory):
    model, tokenizer = tiny_model
    root = tmp_path_factory.mktemp("serving")
    save_model_dir(model, tokenizer, root / "model")
    return export_model(root / "model", root / "export")


def _text_ids(config) -> torch.Tensor:
    """A prompt of plain text tokens (no media placeholders)."""
    placeholders = {config.image_token_id, config.video_token_id, config.audio_token_id}
    return torch.tensor([[i for i in range(10, 40) if i not in placeholders][:7]])


def test_config_maps_auto_model_and_the_model_declares_the_attention_backend(export):
    assert "AutoModel" in json.loads((export / "config.json").read_text())["auto_map"]
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    model = AutoModel.from_config(config, trust_remote_code=True)
    assert type(model).is_backend_compatible() and type(model)._supports_attention_backend
    assert config.get_text_config() is config.text_config  # what vLLM sets its attention on
    # the LLM's tensor-parallel plan reaches the top model, under the LLM's prefix
    assert model.tp_plan["llm.model.layers.*.self_attn.q_proj"] == "colwise"


def test_vllm_style_load_calls_the_registered_attention_in_every_layer_with_the_forward_kwargs(export):
    """vLLM's sequence: the text config's `_attn_implementation` set, `AutoModel.from_config`, then a
    forward with `inputs_embeds`, `position_ids`, `use_cache=False`, `return_dict=False` and its own
    keyword (`attention_instances`), which must arrive at every layer's attention call."""
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    config.get_text_config()._attn_implementation = "recording"
    model = AutoModel.from_config(config, trust_remote_code=True).eval()
    ids = _text_ids(config)
    instances = {"kv cache": object()}
    CALLS.clear()
    with torch.no_grad():
        out = model(input_ids=None, inputs_embeds=model.get_input_embeddings()(ids), use_cache=False,
                    position_ids=torch.arange(ids.shape[1])[None], attention_instances=instances, return_dict=False)
    assert isinstance(out, tuple)
    assert [layer for layer, _ in CALLS] == list(range(config.text_config.num_hidden_layers))
    assert all(kw["attention_instances"] is instances for _, kw in CALLS)


def test_a_registered_attention_computes_what_sdpa_does_from_pretrained_and_when_switched(export):
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    ids = _text_ids(config)
    sdpa = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    recording = AutoModel.from_pretrained(export, trust_remote_code=True, attn_implementation="recording").eval()
    assert recording.llm.config._attn_implementation == "recording"
    with torch.no_grad():
        CALLS.clear()
        expected = sdpa(input_ids=ids).logits
        assert CALLS == []
        torch.testing.assert_close(recording(input_ids=ids).logits, expected)
        assert len(CALLS) == config.text_config.num_hidden_layers
        sdpa.set_attn_implementation("recording")  # switched on a loaded model: reaches the LLM
        CALLS.clear()
        torch.testing.assert_close(sdpa(input_ids=ids).logits, expected)
        assert len(CALLS) == config.text_config.num_hidden_layers

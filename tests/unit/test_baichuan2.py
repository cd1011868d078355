"""Baichuan 2 options (NormHead, max-z loss) against their formulas, and switchable per stage."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omni.config import ConfigError
from omni.model.baichuan2 import MAX_Z_COEF, NormHead
from omni.model.load import load_model
from omni.model.omni_model import OmniModel
from omni.model.processor import OmniProcessor, collate
from omni.presets import build_preset


def _batch(model, tok):
    proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
    chats = [[{"role": "user", "content": "<image> what colour is the shape?"},
              {"role": "assistant", "content": c}] for c in ("red", "blue")]
    exs = [proc(c, {"image": [Image.new("RGB", (32, 32), rgb)]}) for c, rgb in zip(chats, [(200, 0, 0), (0, 0, 200)])]
    return collate(exs, tok.pad_token_id)


def _model(*overrides):
    torch.manual_seed(0)
    return OmniModel.from_config(build_preset("tiny", list(overrides)))


def test_norm_head_logits_use_row_normalised_weights():
    model, tok = _model("llm.norm_head=true")
    head = model.llm.get_output_embeddings()
    assert isinstance(head, NormHead)
    assert "llm.lm_head.weight" in dict(model.named_parameters())  # checkpoints keep their keys
    b = _batch(model, tok)
    with torch.no_grad():
        hidden = model.llm.model(inputs_embeds=model.embed(b.input_ids, b.media),
                                 attention_mask=b.attention_mask).last_hidden_state
        expected = hidden @ (head.weight / head.weight.norm(dim=-1, keepdim=True)).T
        logits = model(b.input_ids, b.attention_mask, media=b.media).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    plain = F.linear(hidden, head.weight)
    assert not torch.allclose(logits, plain, atol=1e-3)  # the option changes the computation


def test_max_z_loss_adds_coef_times_squared_max_logit():
    model, tok = _model(f"llm.max_z_loss={MAX_Z_COEF}")
    b = _batch(model, tok)
    out = model(b.input_ids, b.attention_mask, b.labels, b.media)
    logits, labels = out.logits.detach(), b.labels
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    z = torch.stack([logits[i, t].max() for i in range(labels.shape[0])
                     for t in range(labels.shape[1] - 1) if labels[i, t + 1] != -100])
    expected = ce + MAX_Z_COEF * (z ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-6, rtol=1e-6)
    assert out.loss.item() > ce.item()


def test_options_switch_on_when_continuing_from_a_trained_model(tmp_path):
    model, tok = _model()
    model.save_pretrained(tmp_path / "m", tok)
    loaded, _ = load_model(tmp_path / "m", ["llm.norm_head=true", "llm.max_z_loss=2e-4"])
    assert isinstance(loaded.llm.get_output_embeddings(), NormHead)
    torch.testing.assert_close(loaded.llm.lm_head.weight, model.llm.lm_head.weight, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "n", tok)
    again, _ = load_model(tmp_path / "n")
    assert again.config.llm.norm_head and again.config.llm.max_z_loss == 2e-4


def test_overrides_that_change_weight_shapes_are_refused(tmp_path):
    model, tok = _model()
    model.save_pretrained(tmp_path / "m", tok)
    with pytest.raises(ConfigError, match="architecture is fixed"):
        load_model(tmp_path / "m", ["llm.hf_config.num_hidden_layers=1"])
    with pytest.raises(ConfigError, match="weights do not fit"):
        load_model(tmp_path / "m", ["audio.n_state=64"])

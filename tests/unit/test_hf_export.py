"""Export building blocks in-process: remote-code flattening, config round trip, the HF processor's
text/labels paths and the HF model's training loss (NormHead + max-z) against OmniModel."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from omni.export.remote_code import (
    RemoteCodeError,
    flat_name,
    remote_code_files,
    rewrite,
)
from omni.hf.mapping import hf_config_from_model_config, model_config_from_hf
from omni.model.processor import OmniProcessor, collate


def _hf_config(model):
    return hf_config_from_model_config(model.config, model.llm.config.to_dict(), model.token_ids,
                                       next(model.parameters()).dtype)


def test_flat_names_and_rewrites():
    assert flat_name("encoders.image") == "omni_encoders_image"
    assert flat_name("projectors") == "omni_projectors"
    assert flat_name("omni.model.fusion") == "omni_model_fusion"
    assert flat_name("omni.export.modeling_omni") == "modeling_omni"
    src = "import torch\nfrom encoders.audio import AudioEncoder\nfrom omni.model.fusion import scatter_features\n"
    out, deps = rewrite("encoders.x", src, "x.py")
    assert out.splitlines()[1:] == ["from .omni_encoders_audio import AudioEncoder",
                                    "from .omni_model_fusion import scatter_features"]
    assert deps == ["encoders.audio", "omni.model.fusion"]
    with pytest.raises(RemoteCodeError, match="x.py:1: `import encoders.audio`"):
        rewrite("encoders.x", "import encoders.audio\n", "x.py")
    with pytest.raises(RemoteCodeError, match="not a torch-only omni module"):
        rewrite("encoders.x", "from omni.model.omni_model import OmniModel\n", "x.py")
    with pytest.raises(RemoteCodeError, match="relative imports"):
        rewrite("encoders.x", "from .image import ImageEncoder\n", "x.py")
    with pytest.raises(RemoteCodeError, match="by name"):
        rewrite("encoders.x", "from encoders import image\n", "x.py")


def test_remote_code_closure_is_the_entry_points_and_leaf_modules():
    files = remote_code_files()
    assert {"configuration_omni.py", "modeling_omni.py", "processing_omni.py", "omni_model_fusion.py",
            "omni_model_baichuan2.py", "omni_model_composition.py", "omni_model_processor.py", "omni_model_media_policy.py",
            "omni_model_batch.py", "omni_errors.py", "omni_modalities.py", "omni_encoders_image.py", "omni_encoders_audio.py", "omni_encoders_video.py",
            "omni_encoders_anyres.py", "omni_projectors.py", "omni_projectors_mlp.py",
            "omni_projectors_conv_gmlp.py", "omni_model_talking.py", "omni_speech_talker.py", "omni_speech_delay.py",
            "omni_speech_tiny_codebook.py", "omni_speech_mimi_codec.py"} == set(files)
    for name, text in files.items():
        compile(text, name, "exec")


def test_config_round_trip(tiny_model):
    model, _ = tiny_model
    config = _hf_config(model)
    cfg, text, token_ids = model_config_from_hf(json.loads(config.to_json_string()))
    assert token_ids == model.token_ids
    want, got = model.config, cfg
    for part in ("image", "audio", "video", "anyres", "projectors", "tokenizer", "name"):
        assert getattr(got, part) == getattr(want, part), part
    assert (got.llm.norm_head, got.llm.max_z_loss, got.llm.pretrained) == (
        want.llm.norm_head, want.llm.max_z_loss, want.llm.pretrained)
    from transformers import AutoConfig

    rebuilt = AutoConfig.for_model(**text)
    for key, value in model.llm.config.to_dict().items():
        if key not in ("transformers_version", "architectures", "dtype", "_name_or_path"):
            assert rebuilt.to_dict()[key] == value, key
    assert json.loads(config.to_json_string())["talker_config"] is None  # text out: no talker


def test_config_round_trip_keeps_the_talker(tiny_model):
    from omni.presets import build_preset

    model, _ = tiny_model
    want = build_preset("tiny", ["talker.enabled=true", "talker.codec=mimi", "talker.codec_pretrained=kyutai/mimi",
                                 "talker.codebooks=8", "talker.codebook_size=2048", "talker.max_frames=40"])
    config = hf_config_from_model_config(want, model.llm.config.to_dict(), model.token_ids, torch.float32)
    saved = json.loads(config.to_json_string())
    assert saved["talker_config"]["codec_pretrained"] == "kyutai/mimi" and "enabled" not in saved["talker_config"]
    cfg, _, _ = model_config_from_hf(saved)
    assert cfg.talker == want.talker and cfg.talker.enabled


def _hf_pair(*overrides):
    """An OmniModel and the exported OmniForCausalLM class (repository copy) with its weights."""
    from omni.export.modeling_omni import OmniForCausalLM
    from omni.export.processing_omni import OmniProcessor as HFProcessor
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    torch.manual_seed(0)
    model, tok = OmniModel.from_config(build_preset("tiny", list(overrides)))
    hf = OmniForCausalLM(_hf_config(model))
    hf.load_state_dict(model.state_dict(), strict=True)
    proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
    hf_proc = HFProcessor(tok, chat_template=tok.chat_template, **proc.configs())
    return model.eval(), hf.eval(), tok, proc, hf_proc


def test_hf_training_loss_equals_omni_with_norm_head_and_max_z():
    model, hf, tok, proc, hf_proc = _hf_pair("llm.norm_head=true", "llm.max_z_loss=2e-4")
    rng = np.random.default_rng(0)
    chats = [[{"role": "user", "content": "<image> what colour is the shape?"},
              {"role": "assistant", "content": "red"}],
             [{"role": "user", "content": "<audio> which note is played?"}, {"role": "assistant", "content": "do"}]]
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    wav = (rng.standard_normal(8000) * 0.1).astype(np.float32)
    batch = collate([proc(chats[0], {"image": [image]}), proc(chats[1], {"audio": [wav]})], tok.pad_token_id)
    inputs = hf_proc(messages=chats, images=[image], audio=[wav], return_labels=True)
    assert torch.equal(inputs["labels"], batch.labels) and torch.equal(inputs["input_ids"], batch.input_ids)
    for n in (None, 3.0):
        ours = model(batch.input_ids, batch.attention_mask, batch.labels, batch.media, num_items_in_batch=n).loss
        kwargs = {} if n is None else {"num_items_in_batch": n}
        theirs = hf(**inputs, **kwargs).loss
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_text_path_equals_messages_path():
    _, _, tok, _, hf_proc = _hf_pair()
    messages = [{"role": "user", "content": "<image> what colour is the shape?"}]
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    a = hf_proc(messages=messages, images=[image], add_generation_prompt=True)
    b = hf_proc(text=text, images=[image])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="1 '<image>' placeholder"):
        hf_proc(messages=messages, images=[image, image])


def test_bfloat16_export_writes_bf16_weights_and_loads_back(tmp_path, tiny_model):
    from safetensors import safe_open

    from omni.export.writer import export_model
    from omni.model.load import load_model

    model, tok = tiny_model
    model.save_pretrained(tmp_path / "m", tok)
    out = export_model(tmp_path / "m", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 == {torch.bfloat16}
    loaded, _ = load_model(out)
    w = model.state_dict()["llm.model.embed_tokens.weight"]
    assert torch.equal(loaded.state_dict()["llm.model.embed_tokens.weight"], w.to(torch.bfloat16).float())


def test_7b_transformers_model_has_omnimodel_keys_and_shapes(qwen2_7b):
    """The SigLIP (timm) + whisper-large-v3 + Qwen2-7B layout, built on the meta device both ways."""
    from omni.export.modeling_omni import OmniForCausalLM
    from omni.model.omni_model import OmniModel, build_llm
    from omni.presets import build_preset

    cfg = build_preset("7b", ["image.pretrained=null", "audio.checkpoint=null", *qwen2_7b])
    with torch.device("meta"):
        llm = build_llm(cfg, pretrained=False)
        model = OmniModel(cfg, llm, {"image": 151646, "video": 151647, "audio": 151648}, pretrained=False)
        hf = OmniForCausalLM(_hf_config(model))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert sum(v.numel() for v in model.parameters()) == sum(v.numel() for v in hf.parameters())


def test_the_pickle_check_takes_a_safetensors_header_length_of_128_mod_256(tmp_path):
    """A safetensors file starts with its header's length: 0x80, pickle's first byte, one time in 32."""
    import pickle

    from safetensors.torch import save_file

    from omni.export.writer import ExportError, _check_no_pickles

    weights = tmp_path / "model.safetensors"
    for pad in range(300):
        save_file({"w": torch.zeros(2)}, str(weights), metadata={"pad": "x" * pad})
        if weights.read_bytes()[0] == 0x80:
            break
    assert weights.read_bytes()[0] == 0x80
    _check_no_pickles(tmp_path)
    weights.write_bytes(pickle.dumps({"w": [0.0, 0.0]}))
    with pytest.raises(ExportError, match="model.safetensors: looks like a pickle"):
        _check_no_pickles(tmp_path)

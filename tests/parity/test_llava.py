"""Image path vs transformers' LLaVA: same weights (through omni/hf/llava.py), same logits in fp32.

A tiny ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer GELU projector, Qwen2 LM)
is random-initialised; an ``OmniModel`` is built from the LLaVA config through
``omni_image_config_from_llava`` (open_clip tower with ``feature_layer``), MLP projector without
pooling and the same Qwen2 config, and gets LLaVA's weights through the documented key map.
"""
from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

from omni.hf.llava import (
    llava_to_omni_state_dict,
    load_llava_weights,
    omni_image_config_from_llava,
)
from omni.model.batch import MediaBatch
from omni.model.omni_model import OmniModel, build_llm
from omni.presets import LLMConfig, ProjectorConfig, build_preset

IMAGE_ID, VIDEO_ID, AUDIO_ID = 60, 61, 62
TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)  # fmt: skip
VISION = dict(
    image_size=32, patch_size=4, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2
)
QUICKGELU_NAME = "omni-parity-tiny-vit-quickgelu"


@pytest.fixture(scope="module")
def quickgelu_registered(tmp_path_factory):
    """A tiny open_clip model config with quick_gelu, the activation of OpenAI CLIP / LLaVA-1.5."""
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{QUICKGELU_NAME}.json"
    vision = {"image_size": 32, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    path.write_text(json.dumps({"embed_dim": 16, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(path)
    return QUICKGELU_NAME


def _llava(hidden_act: str, feature_layer: int) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, hidden_act=hidden_act),
        text_config=Qwen2Config(**TEXT),
        image_token_id=IMAGE_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=feature_layer,
        image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def _omni_from(llava: LlavaForConditionalGeneration, open_clip_model: str | None) -> OmniModel:
    base = build_preset("tiny")
    cfg = dataclasses.replace(
        base,
        name="llava-parity",
        llm=LLMConfig(hf_config={"model_type": "qwen2", **TEXT}, attn_implementation="sdpa"),
        image=omni_image_config_from_llava(llava.config, open_clip_model=open_clip_model),
        projectors={**base.projectors, "image": ProjectorConfig(kind="mlp", options={"pool": False})},
    )
    torch.manual_seed(1)  # different init: every compared weight must come from LLaVA
    token_ids = {"image": IMAGE_ID, "video": VIDEO_ID, "audio": AUDIO_ID}
    return OmniModel(cfg, build_llm(cfg, pretrained=False), token_ids, pretrained=False).eval()


def _inputs(n_image_tokens: int):
    """Two rows, one image each, image tokens expanded; row 1 left-padded."""
    g = torch.Generator().manual_seed(2)
    text = lambda n: torch.randint(0, 50, (n,), generator=g)  # noqa: E731 - ids below the special ids
    image = torch.full((n_image_tokens,), IMAGE_ID)
    row0 = torch.cat([text(5), image, text(7)])
    row1 = torch.cat([torch.zeros(4, dtype=torch.long), text(3), image, text(5)])
    input_ids = torch.stack([row0, row1])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"], generator=g)
    return input_ids, attention_mask, pixels


@pytest.mark.parametrize(
    "hidden_act, vision_feature_layer, use_open_clip_name",
    [
        ("gelu", -1, False),  # last block, no post_layernorm
        ("gelu", -2, False),  # penultimate block (LLaVA-1.5's choice); last block pruned
        ("gelu", 1, False),  # HF positive index: hidden_states[1] = output of block 0
        ("quick_gelu", -2, True),  # LLaVA-1.5's tower activation, via a registered open_clip config
    ],
)
@torch.no_grad()
def test_omni_image_path_matches_llava_logits(
    hidden_act, vision_feature_layer, use_open_clip_name, quickgelu_registered, check_close
):
    llava = _llava(hidden_act, vision_feature_layer)
    omni = _omni_from(llava, quickgelu_registered if use_open_clip_name else None)
    dropped = load_llava_weights(omni, llava.state_dict())

    n_blocks = VISION["num_hidden_layers"]
    kept = n_blocks + vision_feature_layer + 1 if vision_feature_layer < 0 else vision_feature_layer
    assert len(omni.encoders["image"].visual.transformer.resblocks) == kept
    assert {k.split("visual.")[1].split(".")[0] for k in dropped} <= {"ln_post", "transformer"}
    assert any("ln_post" in k for k in dropped)  # LLaVA never applies post_layernorm to its features
    assert omni.image_tokens() == llava.config.image_seq_length == 64

    input_ids, attention_mask, pixels = _inputs(omni.image_tokens())
    ref_features = llava.model.get_image_features(pixels).pooler_output
    features = omni.encode("image", MediaBatch(image=pixels))
    check_close("projected image features", features, torch.cat(ref_features), atol=1e-5)

    ref = llava(input_ids=input_ids, pixel_values=pixels, attention_mask=attention_mask).logits
    got = omni(input_ids, attention_mask=attention_mask, media=MediaBatch(image=pixels)).logits
    check_close("logits", got, ref, atol=1e-5)
    assert ref.abs().max() > 0.05  # not a degenerate all-zero comparison


def test_key_map_covers_every_llava_key_and_fuses_qkv():
    llava = _llava("gelu", -2)
    sd = llava.state_dict()
    converted = llava_to_omni_state_dict(sd)
    n_layers = VISION["num_hidden_layers"]
    assert len(converted) == len(sd) - 2 * 2 * n_layers  # q,k,v (weight, bias) -> in_proj (weight, bias)
    fused = converted["encoders.image.visual.transformer.resblocks.1.attn.in_proj_weight"]
    prefix = "model.vision_tower.encoder.layers.1.self_attn."
    torch.testing.assert_close(fused, torch.cat([sd[prefix + f"{w}_proj.weight"] for w in "qkv"]), rtol=0, atol=0)
    with pytest.raises(KeyError, match="no mapping"):
        llava_to_omni_state_dict({**sd, "model.vision_tower.head.weight": torch.zeros(1)})
    del sd[prefix + "v_proj.bias"]
    with pytest.raises(KeyError, match="q/k/v incomplete"):
        llava_to_omni_state_dict(sd)


def test_unreproducible_llava_configs_are_rejected(quickgelu_registered):
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full'"):
        omni_image_config_from_llava(
            LlavaConfig(vision_config=CLIPVisionConfig(**VISION, hidden_act="gelu"), text_config=Qwen2Config(**TEXT),
                        vision_feature_select_strategy="full", projector_hidden_act="gelu")
        )  # fmt: skip
    quick = _llava("quick_gelu", -2).config
    with pytest.raises(ValueError, match="quick_gelu"):
        omni_image_config_from_llava(quick)
    with pytest.raises(ValueError, match="quick_gelu"):
        omni_image_config_from_llava(_llava("gelu", -2).config, open_clip_model=quickgelu_registered)
    with pytest.raises(ValueError, match="0 is the embeddings"):
        omni_image_config_from_llava(_llava("gelu", 0).config)

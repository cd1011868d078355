"""The 7B preset is the published model: instantiate it on the meta device and count parameters."""
from __future__ import annotations

import pytest

from omni.model.table import meta_model

# Published sizes of the parts (parameters):
# Qwen2-7B: 7.62B (model card). SigLIP So400m/14 vision tower: 428M ("Getting ViT in Shape",
# SoViT-400m/14), of which 15.2M is the attention-pooling (MAP) head that patch-token features
# never use, so the tower we keep is 413M. Whisper large-v3 encoder: 635M, the encoder half of
# the 1.55B model.
PUBLISHED = {"llm": 7.62e9, "image_tower": 428e6 - 15.2e6, "audio_tower": 635e6}


@pytest.fixture(scope="module")
def model_7b(qwen2_7b):
    return meta_model("7b", qwen2_7b)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_7b_parts_match_published_sizes(model_7b):
    counts = {"llm": _count(model_7b.llm), "image_tower": _count(model_7b.encoders["image"]),
              "audio_tower": _count(model_7b.encoders["audio"])}
    for part, published in PUBLISHED.items():
        assert abs(counts[part] - published) / published < 0.02, (part, counts[part], published)
    assert all(p.device.type == "meta" for p in model_7b.parameters())


def test_7b_token_arithmetic_matches_the_paper(model_7b):
    image = model_7b.encoders["image"]
    assert (image.image_size, image.grid_size, image.num_patches) == (384, 27, 729)
    assert model_7b.image_tokens() == 182                      # 729 patches pooled 2x2
    audio = model_7b.encoders["audio"]
    assert audio.valid_frames(audio.window_samples) == 1500   # 30 s window at 50 frames/s
    assert model_7b.audio_window_tokens(1500) / 30 == 12.5    # stride-4 Conv-GMLP: 12.5 tokens/s
    assert model_7b.video_tokens(48) == 48 * 182
    assert model_7b.config.video.fps == 1.0 and model_7b.config.video.max_frames == 48


def test_tiny_and_7b_share_llm_and_projector_classes(model_7b, tiny_model):
    tiny, _ = tiny_model
    assert type(model_7b.llm) is type(tiny.llm)
    for m in ("image", "video", "audio"):
        assert type(model_7b.projectors[m]) is type(tiny.projectors[m])


def test_7b_processor_counts_come_from_the_config(model_7b, tiny_model):
    """The processor's token arithmetic, from the model config alone, equals the built model's;
    its image transform is the one open_clip resolves for the preset's pretrained tag."""
    from open_clip.pretrained import get_pretrained_cfg

    from omni.model.processor import OmniProcessor

    _, tok = tiny_model  # any tokenizer holding the placeholders
    ids = {m: tok.convert_tokens_to_ids(f"<{m}>") for m in ("image", "video", "audio")}
    proc = OmniProcessor.from_config(model_7b.config, tok, ids)
    assert proc.image_tokens == model_7b.image_tokens() == 182
    assert proc.frame_tokens == model_7b.video_tokens(1)
    assert proc.max_length == model_7b.llm.config.max_position_embeddings
    webli = get_pretrained_cfg("ViT-SO400M-14-SigLIP-384", "webli")
    preprocess = proc.configs()["image_config"]["preprocess"]
    assert (tuple(preprocess["mean"]), preprocess["size"]) == (tuple(webli["mean"]), 384)


def test_small_is_tens_of_millions_with_7b_proportions_and_classes(model_7b):
    """`small` (bench/mfu.py's model) is built from the 7B's classes with Qwen2-7B's proportions."""
    small = meta_model("small")
    llm, big = small.llm.config, model_7b.llm.config
    assert 20e6 < _count(small.llm) < 100e6 and _count(small) < 150e6
    assert llm.hidden_size // llm.num_attention_heads == big.hidden_size // big.num_attention_heads == 128
    assert llm.num_attention_heads // llm.num_key_value_heads == big.num_attention_heads // big.num_key_value_heads
    assert abs(llm.intermediate_size / llm.hidden_size - big.intermediate_size / big.hidden_size) < 0.1
    assert not llm.tie_word_embeddings and not big.tie_word_embeddings
    for name in ("image", "audio"):
        assert type(small.encoders[name]) is type(model_7b.encoders[name])
    assert type(small.llm) is type(model_7b.llm)
    for m in ("image", "video", "audio"):
        assert type(small.projectors[m]) is type(model_7b.projectors[m])

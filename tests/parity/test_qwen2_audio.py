"""Audio path vs transformers' Qwen2-Audio: equal up to the encoder's last block, then by design different.

Qwen2-Audio (transformers ``Qwen2AudioForConditionalGeneration``):
    WhisperFeatureExtractor log-mel -> Qwen2AudioEncoder blocks (padding frames masked out of
    self-attention) -> AvgPool1d(2, 2) -> LayerNorm -> Linear projector (25 tokens/s).
omni:
    whisper.log_mel_spectrogram -> openai-whisper AudioEncoder blocks (no mask) -> ln_post
    -> Conv-GMLP (stride 4: 12.5 tokens/s).
The log-mel and the encoder trunk (convs, positions, blocks) are the same computation and are
tested equal here, inside Qwen2-Audio's own forward. What differs (docs/decisions.md,
"Parity with reference implementations"): the final LayerNorm comes after pooling in
Qwen2-Audio and before the projector in whisper, and LN(mean(x)) != mean(LN(x)), so no
Conv-GMLP setting reproduces Qwen2-Audio's projector input; Qwen2-Audio masks the padded tail
of a window, whisper (and omni) attend over it; token rates differ (25 vs 12.5 tokens/s).

Key map, ``Qwen2AudioEncoder.state_dict()`` -> omni ``AudioEncoder`` (openai-whisper names,
``i`` = layer):
    conv1.*, conv2.*                              -> encoder.conv1.*, encoder.conv2.*
    embed_positions.weight                        -> encoder.positional_embedding
    layers.i.self_attn.{q,k,v}_proj.* (k: no bias) -> encoder.blocks.i.attn.{query,key,value}.*
    layers.i.self_attn.out_proj.*                 -> encoder.blocks.i.attn.out.*
    layers.i.self_attn_layer_norm.*               -> encoder.blocks.i.attn_ln.*
    layers.i.fc1.*, layers.i.fc2.*                -> encoder.blocks.i.mlp.0.*, encoder.blocks.i.mlp.2.*
    layers.i.final_layer_norm.*                   -> encoder.blocks.i.mlp_ln.*
    layer_norm.*                                  -> encoder.ln_post.* (same shape, applied at another point)
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2Config,
    WhisperFeatureExtractor,
)

from encoders import SAMPLE_RATE, AudioEncoder, AudioTowerConfig

AUDIO_ID = 60
N_CTX = 50  # encoder frames per window: 1 s windows, 100 mel frames (the tiny preset's window)
OURS = AudioTowerConfig(n_mels=80, n_ctx=N_CTX, n_state=32, n_head=2, n_layer=2)
QWEN_AUDIO = dict(
    num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
    max_source_positions=N_CTX,  # Qwen2AudioEncoder requires exactly 2 * max_source_positions mel frames
)  # fmt: skip
QWEN_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip

_RENAMES = [
    (r"^(conv[12]\.(?:weight|bias))$", r"encoder.\1"),
    (r"^embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^layers\.(\d+)\.self_attn\.q_proj\.", r"encoder.blocks.\1.attn.query."),
    (r"^layers\.(\d+)\.self_attn\.k_proj\.", r"encoder.blocks.\1.attn.key."),
    (r"^layers\.(\d+)\.self_attn\.v_proj\.", r"encoder.blocks.\1.attn.value."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.blocks.\1.attn.out."),
    (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.blocks.\1.attn_ln."),
    (r"^layers\.(\d+)\.fc1\.", r"encoder.blocks.\1.mlp.0."),
    (r"^layers\.(\d+)\.fc2\.", r"encoder.blocks.\1.mlp.2."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"encoder.blocks.\1.mlp_ln."),
    (r"^layer_norm\.", "encoder.ln_post."),
]


def qwen2_audio_encoder_to_whisper(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, template in _RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            raise KeyError(f"no mapping for Qwen2AudioEncoder key {key!r}")
    return out


@pytest.fixture(scope="module")
def models():
    config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(**QWEN_AUDIO), text_config=Qwen2Config(**QWEN_TEXT),
        audio_token_index=AUDIO_ID,
    )  # fmt: skip
    torch.manual_seed(0)
    qwen = Qwen2AudioForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    ours = AudioEncoder(OURS).eval()
    ours.load_state_dict(qwen2_audio_encoder_to_whisper(qwen.model.audio_tower.state_dict()), strict=True)
    return qwen, ours


def _waveforms(*lengths: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def _run_qwen(qwen, mel: torch.Tensor, valid_mel_frames: list[int]) -> dict[str, torch.Tensor]:
    """Qwen2-Audio's full forward; returns its encoder trunk (before pooling) and encoder output."""
    tower, seen = qwen.model.audio_tower, {}
    hooks = [
        tower.avg_pooler.register_forward_pre_hook(lambda m, a: seen.__setitem__("trunk", a[0].transpose(1, 2))),
        tower.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.last_hidden_state)),
    ]
    feature_mask = torch.zeros(len(valid_mel_frames), mel.shape[-1], dtype=torch.long)
    for row, n in enumerate(valid_mel_frames):
        feature_mask[row, :n] = 1
    _, n_tokens = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
    width = int(n_tokens.max()) + 3
    input_ids = torch.ones(len(valid_mel_frames), width, dtype=torch.long)
    for row, n in enumerate(n_tokens.tolist()):
        input_ids[row, 1 : 1 + n] = AUDIO_ID
    try:
        with torch.no_grad():
            qwen(input_ids=input_ids, input_features=mel, feature_attention_mask=feature_mask,
                 attention_mask=torch.ones_like(input_ids))  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    return seen


def _run_ours(ours: AudioEncoder, mel: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}
    hook = ours.encoder.ln_post.register_forward_pre_hook(lambda m, a: seen.__setitem__("trunk", a[0]))
    try:
        with torch.no_grad():
            seen["out"] = ours(mel)
    finally:
        hook.remove()
    return seen


def test_log_mel_matches_qwen2_audio_feature_extractor(models, check_close):
    """Qwen2-Audio's processor uses WhisperFeatureExtractor; omni uses whisper.log_mel_spectrogram."""
    qwen, ours = models
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=ours.window_samples // SAMPLE_RATE)
    waves = _waveforms(16000, 9000, 20000)  # full, padded, trimmed windows
    got = torch.stack([ours.log_mel(w) for w in waves])
    theirs = extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
    check_close("log-mel", got, theirs["input_features"], atol=1e-5)
    # its valid mel frames are ceil(samples / 160); after its stride-2 conv that is omni's valid encoder frames
    valid_mel = theirs["attention_mask"].sum(-1)
    assert valid_mel.tolist() == [100, 57, 100]
    encoder_frames, _ = qwen.model.audio_tower._get_feat_extract_output_lengths(valid_mel)
    assert encoder_frames.tolist() == [ours.valid_frames(w.size) for w in waves] == [50, 29, 50]


def test_encoder_trunk_matches_qwen2_audio_on_full_windows(models, check_close):
    qwen, ours = models
    mel = torch.stack([ours.log_mel(w) for w in _waveforms(16000, 20000)])
    theirs = _run_qwen(qwen, mel, valid_mel_frames=[2 * N_CTX, 2 * N_CTX])  # no padding: mask all ones
    mine = _run_ours(ours, mel)
    check_close("encoder trunk (last block output)", mine["trunk"], theirs["trunk"], atol=1e-5)
    # The divergence is only the tail: Qwen2-Audio = LayerNorm(AvgPool2(trunk)) with the same LN weights
    # that whisper applies before pooling (ln_post); the two orders give different features.
    tail = F.avg_pool1d(mine["trunk"].transpose(1, 2), 2, 2).transpose(1, 2)
    ln = ours.encoder.ln_post
    reordered = F.layer_norm(tail, (tail.shape[-1],), ln.weight, ln.bias, ln.eps)
    check_close("LN(avgpool2(omni trunk)) vs Qwen2-Audio encoder output", reordered, theirs["out"], atol=1e-5)
    ours_pooled = F.avg_pool1d(mine["out"].transpose(1, 2), 2, 2).transpose(1, 2)
    order_gap = (ours_pooled - theirs["out"]).abs().max().item()
    print(f"\n[parity] avgpool2(omni encoder output = LN first) vs Qwen2-Audio encoder output: {order_gap:.3e}")
    assert order_gap > 1e-2  # pooling after vs before the LayerNorm is a real difference


def test_padded_window_differs_because_qwen2_audio_masks_padding(models):
    """Documented difference: on a partly filled window Qwen2-Audio masks the padded frames, whisper does not."""
    qwen, ours = models
    (wave,) = _waveforms(9000)  # 0.56 s in a 1 s window
    mel = ours.log_mel(wave)[None]
    valid = ours.valid_frames(wave.size)  # 29 encoder frames carry audio
    theirs = _run_qwen(qwen, mel, valid_mel_frames=[2 * valid - 1])  # 57 = ceil(9000 / 160) mel frames
    mine = _run_ours(ours, mel)
    gap = (mine["trunk"][:, :valid] - theirs["trunk"][:, :valid]).abs().max().item()
    print(f"\n[parity] encoder trunk on the {valid} real frames of a padded window: {gap:.3e} (masked vs unmasked)")
    assert gap > 1e-3
    # token counts for this window: Qwen2-Audio ((57-1)//2+1 - 2)//2 + 1 = 14, omni ceil(29 / 4) = 8
    _, qwen_tokens = qwen.model.audio_tower._get_feat_extract_output_lengths(torch.tensor([2 * valid - 1]))
    assert (int(qwen_tokens), -(-valid // 4)) == (14, 8)

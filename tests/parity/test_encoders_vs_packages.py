"""omni's encoders vs the packages they wrap, on the same weights and inputs.

- image: ``ImageEncoder`` tokens vs open_clip's own forward of the full CLIP model (text tower
  and heads included) for (1) an open_clip ``VisionTransformer`` built from a config dict and
  (2) timm-backed open_clip towers: a SigLIP-style trunk (no class token, MAP head, like
  ViT-SO400M-14-SigLIP-384) and a class + register token trunk, each a tiny timm
  ``VisionTransformer`` registered under its own name so open_clip builds it the same way it
  builds the real ones; ``feature_layer`` variants vs the block outputs seen by forward hooks.
- audio: ``AudioEncoder`` on its own log-mel vs openai-whisper's model on
  ``whisper.log_mel_spectrogram`` of the same waveform (bit-exact).
- video: ``sample_frame_indices`` / ``read_video`` vs frame times read back by decord's
  own ``get_frame_timestamp`` on real mp4 files.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from fractions import Fraction

import decord
import numpy as np
import open_clip
import pytest
import torch
import whisper
from timm.models import is_model, register_model
from timm.models.vision_transformer import VisionTransformer as TimmViT
from whisper.model import ModelDimensions, Whisper

from encoders import (
    AudioEncoder,
    AudioTowerConfig,
    ImageEncoder,
    ImageTowerConfig,
    VideoSamplingConfig,
    read_video,
    sample_frame_indices,
)
from tests.helpers import write_mp4

TINY_VISION = {"image_size": 32, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32}
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
DICT_VIT = "omni-parity-dict-vit"
TIMM_TOWERS = {  # open_clip model name -> (timm architecture kwargs, open_clip timm_pool)
    "omni_parity_timm_siglip": (dict(class_token=False, global_pool="map"), "map"),
    "omni_parity_timm_cls_reg": (dict(class_token=True, reg_tokens=2, global_pool="token"), "token"),
}


def _register_timm_arch(name: str, arch: dict) -> None:
    """A tiny timm ViT under its own name, so open_clip builds it through timm.create_model."""
    if is_model(name):
        return

    def entrypoint(pretrained=False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return TimmViT(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, **{**arch, **kwargs})

    entrypoint.__name__ = name
    register_model(entrypoint)


@pytest.fixture(scope="module")
def open_clip_models(tmp_path_factory):
    """Register the tiny open_clip configs; returns {name: path of a saved full-CLIP state dict}."""
    root = tmp_path_factory.mktemp("open_clip_parity")
    configs = {DICT_VIT: {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}}
    for name, (arch, pool) in TIMM_TOWERS.items():
        _register_timm_arch(name, arch)
        vision = {"image_size": 32, "timm_model_name": name, "timm_pool": pool, "timm_proj": "none"}
        configs[name] = {"embed_dim": 64, "vision_cfg": vision, "text_cfg": TINY_TEXT}
    weights = {}
    for i, (name, cfg) in enumerate(configs.items()):
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
        torch.manual_seed(10 + i)
        weights[name] = root / f"{name}.pt"
        torch.save(open_clip.create_model(name).state_dict(), weights[name])
    return weights


def _reference(name: str, weights) -> torch.nn.Module:
    model = open_clip.create_model(name, pretrained=str(weights[name]))
    return model.eval()


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _block_output(blocks: torch.nn.ModuleList, index: int, run) -> torch.Tensor:
    seen = []
    hook = blocks[index].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        run()
    finally:
        hook.remove()
    (out,) = seen
    return out


# ---------------------------------------------------------------- image


@torch.no_grad()
def test_dict_vit_tokens_equal_open_clip_forward(open_clip_models, check_close):
    ref = _reference(DICT_VIT, open_clip_models)
    ref.visual.output_tokens = True
    pixels = _pixels()
    _, want = ref.visual(pixels)  # open_clip's own forward: ln_post, class token split off
    named = ImageEncoder(ImageTowerConfig(open_clip_model=DICT_VIT, pretrained=str(open_clip_models[DICT_VIT]))).eval()
    check_close("named dict ViT tokens vs open_clip forward", named(pixels), want, atol=0)
    # the tiny preset's route: a vision_cfg dict tower, given the same weights
    from_dict = ImageEncoder(ImageTowerConfig(vision_cfg=TINY_VISION)).eval()
    from_dict.load_state_dict({f"visual.{k}": v for k, v in ref.visual.state_dict().items() if k != "proj"})
    check_close("vision_cfg tower tokens vs open_clip forward", from_dict(pixels), want, atol=0)


@pytest.mark.parametrize("feature_layer", [-1, -2, 0])
@torch.no_grad()
def test_dict_vit_feature_layer_is_the_raw_block_output(open_clip_models, feature_layer, check_close):
    ref = _reference(DICT_VIT, open_clip_models)
    pixels = _pixels()
    block = _block_output(ref.visual.transformer.resblocks, feature_layer, lambda: ref.encode_image(pixels))
    weights = str(open_clip_models[DICT_VIT])
    enc = ImageEncoder(ImageTowerConfig(open_clip_model=DICT_VIT, pretrained=weights, feature_layer=feature_layer)).eval()
    check_close(f"feature_layer={feature_layer} vs hooked block output", enc(pixels), block[:, 1:], atol=0)
    if feature_layer == -1:  # ln_post of the last block's output is the default (feature_layer=None) token
        default = ImageEncoder(ImageTowerConfig(open_clip_model=DICT_VIT, pretrained=weights))
        check_close("ln_post(feature_layer=-1) vs default tokens", ref.visual.ln_post(enc(pixels)), default(pixels),
                    atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("name", list(TIMM_TOWERS))
@torch.no_grad()
def test_timm_tower_tokens_equal_open_clip_trunk(open_clip_models, name, check_close):
    ref = _reference(name, open_clip_models)
    trunk = ref.visual.trunk
    pixels = _pixels()
    enc = ImageEncoder(ImageTowerConfig(open_clip_model=name, pretrained=str(open_clip_models[name]))).eval()
    tokens = enc(pixels)
    assert tokens.shape == (2, 64, 64) and enc._num_prefix_tokens == trunk.num_prefix_tokens
    want = trunk.forward_features(pixels)[:, trunk.num_prefix_tokens :]  # final norm, prefix tokens dropped
    check_close(f"{name} tokens vs timm forward_features", tokens, want, atol=0)
    inter = ref.visual.forward_intermediates(
        pixels, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
    )["image_intermediates"][-1]
    check_close(f"{name} tokens vs open_clip forward_intermediates", tokens, inter, atol=0)
    if trunk.num_prefix_tokens == 0:  # SigLIP: open_clip's image embedding = the MAP head we removed, on our tokens
        check_close(f"{name} encode_image vs MAP head on our tokens", ref.encode_image(pixels),
                    ref.visual.head(trunk.forward_head(tokens)), atol=1e-6)  # fmt: skip

    for layer in (-1, -2):
        pruned = ImageEncoder(
            ImageTowerConfig(open_clip_model=name, pretrained=str(open_clip_models[name]), feature_layer=layer)
        ).eval()
        assert len(pruned.visual.trunk.blocks) == 3 + layer + 1
        block = _block_output(trunk.blocks, layer, lambda: trunk.forward_features(pixels))
        check_close(f"{name} feature_layer={layer} vs hooked block output", pruned(pixels),
                    block[:, trunk.num_prefix_tokens :], atol=0)  # fmt: skip


# ---------------------------------------------------------------- audio

TINY_DIMS = ModelDimensions(
    n_mels=80, n_audio_ctx=50, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
    n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1,
)  # fmt: skip
TINY_AUDIO = dict(n_mels=80, n_ctx=50, n_state=32, n_head=2, n_layer=2)  # 1 s windows, as the tiny preset


@torch.no_grad()
def test_audio_features_equal_whisper_on_its_own_log_mel(tmp_path, check_close):
    torch.manual_seed(0)
    model = Whisper(TINY_DIMS).eval()
    path = tmp_path / "tiny.pt"  # the openai-whisper checkpoint format, loaded by omni's own path
    torch.save({"dims": asdict(TINY_DIMS), "model_state_dict": model.state_dict()}, path)
    enc = AudioEncoder(AudioTowerConfig(**TINY_AUDIO, checkpoint=str(path))).eval()
    assert enc.state_dict().keys() == {k for k in model.state_dict() if k.startswith("encoder.")}
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 7000, 23000)]
    ours = enc(torch.stack([enc.log_mel(w) for w in waves]))
    # whisper's own route: pad/trim to the window, log-mel, encoder
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(w), 16000)) for w in waves])
    theirs = model.embed_audio(mels)
    check_close("audio features vs whisper embed_audio", ours, theirs, atol=0)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- video


def _expected_from_decord(reader: decord.VideoReader, fps: float, max_frames: int) -> tuple[list[int], bool]:
    """The documented rule, evaluated on the frame times decord reports: the frame on screen at
    t_k = k / fps for every t_k before the end of the last frame; beyond max_frames, max_frames
    frames whose times are spread evenly from the first frame to the last."""
    spans = reader.get_frame_timestamp(list(range(len(reader))))  # [n, 2] start, end in seconds
    starts, duration = spans[:, 0], float(spans[-1, 1])
    times = [k / fps for k in range(math.ceil(duration * fps - 1e-6))] or [0.0]
    if len(times) > max_frames:
        targets = np.linspace(starts[0], starts[-1], max_frames)
        return [int(np.argmin(np.abs(starts - t))) for t in targets], True
    return [int(np.searchsorted(starts, t + 1e-4, side="right") - 1) for t in times], False


@pytest.mark.parametrize(
    "num_frames, rate, fps, max_frames, size",
    [
        (1, 10, 1.0, 48, (32, 32)),  # one frame
        (25, 25, 1.0, 48, (32, 32)),  # exactly 1 s
        (26, 25, 1.0, 48, (32, 32)),  # just over 1 s: a second sample
        (100, Fraction(30000, 1001), 1.0, 48, (32, 32)),  # NTSC rate
        (7, 3, 2.0, 48, (33, 31)),  # 2 of 3 native fps: uneven frame steps; odd frame size
        (40, 8, 0.5, 48, (64, 40)),
        (96, 2, 1.0, 48, (32, 32)),  # 48 s at 1 fps: exactly the cap, not capped
        (98, 2, 1.0, 48, (32, 32)),  # 49 s: capped, uniform
        (150, Fraction(24000, 1001), 1.0, 48, (32, 32)),  # 6.3 s, not capped
        (60, 1, 1.0, 48, (32, 32)),  # 60 s at native 1 fps: capped
        (60, 4, 1.0, 4, (32, 32)),  # tiny preset cap
    ],
)
def test_sampled_frames_follow_the_rule_on_decord_timestamps(tmp_path, num_frames, rate, fps, max_frames, size):
    path = tmp_path / "clip.mp4"
    write_mp4(path, num_frames, rate, *size)
    reader = decord.VideoReader(str(path), num_threads=1)
    assert len(reader) == num_frames
    expected, capped = _expected_from_decord(reader, fps, max_frames)
    indices = sample_frame_indices(len(reader), reader.get_avg_fps(), fps, max_frames)
    assert indices == expected
    assert capped == (math.ceil(num_frames / float(rate) * fps - 1e-6) > max_frames)
    if capped:
        assert indices[0] == 0 and indices[-1] == num_frames - 1 and len(indices) == max_frames
    else:  # every sampled frame is on screen at t_k = k / fps, by decord's [start, end)
        for k, (start, end) in enumerate(reader.get_frame_timestamp(indices)):
            assert start - 1e-4 <= k / fps < end + 1e-4, (k, indices[k], start, end)
    # the decoded frames are those frames, RGB at native size, from a path and from bytes
    frames = read_video(path, VideoSamplingConfig(fps=fps, max_frames=max_frames)).frames
    want = reader.get_batch(indices).asnumpy()
    assert len(frames) == len(indices)
    for frame, ref in zip(frames, want):
        assert frame.mode == "RGB" and frame.size == size
        np.testing.assert_array_equal(np.asarray(frame), ref)
    from_bytes = read_video(path.read_bytes(), VideoSamplingConfig(fps=fps, max_frames=max_frames)).frames
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, from_bytes))

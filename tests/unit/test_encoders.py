"""Encoders, run for real at tiny sizes: open_clip towers (incl. feature_layer pruning), the frame
sampling rule and decord reading on real mp4s, whisper checkpoint loading, PyAV audio decoding, and
meta-device 7B-preset counts. Equality with open_clip / whisper / decord themselves: tests/parity."""

import json
import wave
from dataclasses import asdict

import av
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from whisper.model import ModelDimensions, Whisper

from encoders import (
    AudioEncoder,
    AudioTowerConfig,
    ImageEncoder,
    ImageTowerConfig,
    VideoSamplingConfig,
    load_audio,
    read_video,
    sample_frame_indices,
)
from tests.helpers import write_mp4

TINY_VISION = {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32}
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_every_param_gets_grad(module: torch.nn.Module, out: torch.Tensor) -> None:
    out.square().mean().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing, f"parameters unused by the token output: {missing}"


# ---------------------------------------------------------------- image


@pytest.fixture(scope="module")
def registered_tiny_models(tmp_path_factory):
    """Register tiny open_clip model configs (native ViT, timm ViT) so the named-model path runs for real."""
    root = tmp_path_factory.mktemp("open_clip_configs")
    configs = {
        "omni-test-tiny-vit": {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT},
        "omni-test-tiny-timm": {
            "embed_dim": 16,
            "vision_cfg": {
                "image_size": 224,
                "timm_model_name": "vit_tiny_patch16_224",
                "timm_pool": "token",
                "timm_proj": "linear",
            },
            "text_cfg": TINY_TEXT,
        },
    }
    for name, cfg in configs.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
    return list(configs)


def test_image_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        ImageTowerConfig()
    with pytest.raises(ValueError, match="exactly one"):
        ImageTowerConfig(open_clip_model="ViT-B-16", vision_cfg=TINY_VISION)
    with pytest.raises(ValueError, match="not in open_clip's registry"):
        ImageTowerConfig(open_clip_model="ViT-Nope-1")
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        ImageTowerConfig(vision_cfg={**TINY_VISION, "depth": 2})
    with pytest.raises(ValueError, match="pretrained only applies"):
        ImageTowerConfig(vision_cfg=TINY_VISION, pretrained="webli")
    with pytest.raises(ValueError, match="ModifiedResNet"):
        ImageEncoder(ImageTowerConfig(vision_cfg={**TINY_VISION, "layers": [1, 1, 1, 1], "width": 8}))
    with pytest.raises(ValueError, match="pool_type"):
        ImageEncoder(ImageTowerConfig(vision_cfg={**TINY_VISION, "pool_type": "none"}))


def test_image_tiny_dict_tower_returns_normalised_patch_tokens():
    torch.manual_seed(0)
    enc = ImageEncoder(ImageTowerConfig(vision_cfg=TINY_VISION))
    assert (enc.out_dim, enc.image_size, enc.grid_size, enc.num_patches) == (64, 32, 8, 64)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = enc(pixels)
    assert tokens.shape == (2, 64, 64)  # equality with open_clip's own forward: tests/parity
    assert "visual.proj" not in dict(enc.named_parameters())  # contrastive projection removed
    _assert_every_param_gets_grad(enc, tokens)
    with pytest.raises(ValueError, match=r"expected pixels \[N, 3, 32, 32\]"):
        enc(torch.randn(1, 3, 16, 16))


def test_image_preprocess_uses_open_clip_eval_transform():
    enc = ImageEncoder(ImageTowerConfig(vision_cfg=TINY_VISION))
    images = [Image.new("RGB", (64, 40), (255, 0, 0)), Image.new("L", (20, 20), 128), Image.new("RGBA", (32, 32))]
    pixels = enc.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(pixels[0, :, 16, 16], (torch.tensor([1.0, 0.0, 0.0]) - mean) / std)
    torch.testing.assert_close(pixels[1, :, 5, 5], (torch.full((3,), 128 / 255) - mean) / std)
    assert enc(pixels).shape == (3, 64, 64)


def test_image_named_timm_tower_strips_prefix_and_head(registered_tiny_models):
    enc = ImageEncoder(ImageTowerConfig(open_clip_model="omni-test-tiny-timm"))
    assert (enc.out_dim, enc.image_size, enc.grid_size, enc.num_patches) == (192, 224, 14, 196)
    pixels = torch.randn(1, 3, 224, 224)
    tokens = enc(pixels)
    assert tokens.shape == (1, 196, 192)  # class token dropped; equality with the trunk's output: tests/parity
    _assert_every_param_gets_grad(enc, tokens)  # timm classifier and open_clip head are gone


@pytest.mark.parametrize("feature_layer, kept", [(-1, 2), (-2, 1), (0, 1), (1, 2)])
def test_image_feature_layer_prunes_later_blocks_and_final_norm(feature_layer, kept):
    enc = ImageEncoder(ImageTowerConfig(vision_cfg=TINY_VISION, feature_layer=feature_layer))  # 2 blocks
    assert len(enc.visual.transformer.resblocks) == kept
    assert isinstance(enc.visual.ln_post, torch.nn.Identity)
    assert not any(k.startswith("visual.ln_post") for k in enc.state_dict())
    tokens = enc(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 64, 64)  # class token dropped; block-output equality: tests/parity
    _assert_every_param_gets_grad(enc, tokens)  # nothing unused left for DDP to trip on


def test_image_feature_layer_on_timm_tower(registered_tiny_models):
    enc = ImageEncoder(ImageTowerConfig(open_clip_model="omni-test-tiny-timm", feature_layer=-2))  # 12 blocks
    assert len(enc.visual.trunk.blocks) == 11 and isinstance(enc.visual.trunk.norm, torch.nn.Identity)
    tokens = enc(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 196, 192)
    _assert_every_param_gets_grad(enc, tokens)


def test_image_feature_layer_validation():
    with pytest.raises(ValueError, match="feature_layer must be an int"):
        ImageTowerConfig(vision_cfg=TINY_VISION, feature_layer=True)
    with pytest.raises(ValueError, match="feature_layer must be an int"):
        ImageTowerConfig(vision_cfg=TINY_VISION, feature_layer="-2")
    for bad in (2, -3):
        with pytest.raises(ValueError, match=rf"feature_layer {bad} is out of range .* 2 blocks; use -2..1"):
            ImageEncoder(ImageTowerConfig(vision_cfg=TINY_VISION, feature_layer=bad))


def test_image_named_model_loads_local_pretrained_file(registered_tiny_models, tmp_path):
    torch.manual_seed(1)
    full = open_clip.create_model("omni-test-tiny-vit")
    path = tmp_path / "tiny_clip.pt"
    torch.save(full.state_dict(), path)
    enc = ImageEncoder(ImageTowerConfig(open_clip_model="omni-test-tiny-vit", pretrained=str(path)))
    expected = {f"visual.{k}": v for k, v in full.visual.state_dict().items() if k != "proj"}
    got = enc.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    with pytest.raises(RuntimeError, match="not a known tag or valid file path"):
        ImageEncoder(ImageTowerConfig(open_clip_model="omni-test-tiny-vit", pretrained=str(tmp_path / "missing.pt")))


def test_image_so400m_preset_on_meta_device():
    with torch.device("meta"):
        enc = ImageEncoder(ImageTowerConfig(open_clip_model="ViT-SO400M-14-SigLIP-384"))
        tokens = enc(torch.empty(2, 3, 384, 384))
    assert (enc.out_dim, enc.image_size, enc.grid_size, enc.num_patches) == (1152, 384, 27, 729)
    assert tokens.shape == (2, 729, 1152)
    assert all(p.is_meta for p in enc.parameters())
    assert _params(enc) == 412_987_248  # SigLIP SO400M trunk without its MAP head (428,225,600 with it)
    # random init still gets SigLIP's preprocessing (open_clip would default to OpenAI CLIP's)
    assert enc.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and enc.preprocess_cfg["resize_mode"] == "squash"
    with torch.device("meta"), pytest.raises(ValueError, match="meta device"):
        ImageEncoder(ImageTowerConfig(open_clip_model="ViT-SO400M-14-SigLIP-384", pretrained="webli"))


# ---------------------------------------------------------------- video


def test_video_config_validation():
    with pytest.raises(ValueError, match="fps"):
        VideoSamplingConfig(fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        VideoSamplingConfig(max_frames=0)


@pytest.mark.parametrize(
    "num_frames, native_fps, fps, max_frames, expected",
    [
        (1, 10.0, 1.0, 48, [0]),
        (25, 25.0, 1.0, 48, [0]),
        (26, 25.0, 1.0, 48, [0, 25]),
        (250, 25.0, 1.0, 48, list(range(0, 250, 25))),
        (100, 30000 / 1001, 1.0, 48, [0, 29, 59, 89]),
        (7, 3.0, 2.0, 48, [0, 1, 3, 4, 6]),  # t = 0, .5, 1, 1.5, 2 s at 3 fps
        (5, 2.0, 4.0, 48, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),  # fps above native repeats frames
        (3000, 30.0, 1.0, 5, [0, 750, 1500, 2249, 2999]),  # 100 s capped at 5: linspace, rounded
    ],
)
def test_sample_frame_indices_rule(num_frames, native_fps, fps, max_frames, expected):
    assert sample_frame_indices(num_frames, native_fps, fps, max_frames) == expected


def test_sample_frame_indices_rejects_bad_input():
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(0, 25.0, 1.0, 4)
    with pytest.raises(ValueError, match="native_fps"):
        sample_frame_indices(10, 0.0, 1.0, 4)


def test_read_video_caps_uniformly(tmp_path):
    path = tmp_path / "long.mp4"
    write_mp4(path, 60, 4, 32, 32)  # 15 s at 4 fps: 1 fps would give 15 frames
    clip = read_video(path, VideoSamplingConfig(fps=1.0, max_frames=4))
    frames = clip.frames
    assert clip.spread and clip.seconds == 15.0
    assert len(frames) == 4
    levels = [int(np.asarray(f).mean()) for f in frames]
    assert levels == sorted(levels) and levels[0] < 30 and levels[-1] > 220  # first ... last frame


def test_read_video_names_unreadable_source(tmp_path):
    with pytest.raises(ValueError, match=r"<11 bytes>"):
        read_video(b"not a video", VideoSamplingConfig())
    missing = tmp_path / "missing.mp4"
    with pytest.raises(ValueError, match="missing.mp4"):
        read_video(missing, VideoSamplingConfig())
    narrow = tmp_path / "narrow.mp4"  # decord bug: 16 px wide frames come back with 6 "channels"
    write_mp4(narrow, 3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"narrow.mp4.*dmlc/decord#336"):
        read_video(narrow, VideoSamplingConfig())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        read_video(empty, VideoSamplingConfig())


# ---------------------------------------------------------------- audio

TINY_DIMS = ModelDimensions(
    n_mels=80, n_audio_ctx=8, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
    n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1,
)  # fmt: skip
TINY_AUDIO = dict(n_mels=80, n_ctx=8, n_state=32, n_head=2, n_layer=2)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    torch.manual_seed(0)
    model = Whisper(TINY_DIMS)
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save({"dims": asdict(TINY_DIMS), "model_state_dict": model.state_dict()}, path)
    return model, str(path)


def test_audio_config_validation():
    with pytest.raises(ValueError, match="80 or 128"):
        AudioTowerConfig(n_mels=64)
    with pytest.raises(ValueError, match="divisible"):
        AudioTowerConfig(n_state=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        AudioTowerConfig(n_layer=0)


def test_audio_checkpoint_errors(tiny_whisper, tmp_path):
    _, path = tiny_whisper
    with pytest.raises(ValueError, match="n_layer: config 3 vs checkpoint 2"):
        AudioEncoder(AudioTowerConfig(**{**TINY_AUDIO, "n_layer": 3}, checkpoint=path))
    with pytest.raises(ValueError, match="neither a file nor a whisper model name"):
        AudioEncoder(AudioTowerConfig(**TINY_AUDIO, checkpoint=str(tmp_path / "nope.pt")))
    bare = tmp_path / "bare.pt"
    torch.save({"weights": torch.zeros(1)}, bare)
    with pytest.raises(ValueError, match="'dims' and 'model_state_dict'"):
        AudioEncoder(AudioTowerConfig(**TINY_AUDIO, checkpoint=str(bare)))


def test_audio_windows_and_valid_frames():
    enc = AudioEncoder(AudioTowerConfig(**TINY_AUDIO))  # window = 8 * 2 * 160 = 2560 samples
    assert enc.window_samples == 2560 and enc.out_dim == 32
    assert [enc.valid_frames(n) for n in (0, 1, 320, 321, 2559, 2560, 10_000)] == [1, 1, 1, 2, 8, 8, 8]
    assert [w.size for w in enc.split_windows(np.zeros(6000))] == [2560, 2560, 880]
    assert [w.size for w in enc.split_windows(np.zeros(2560))] == [2560]
    assert enc.log_mel(np.zeros(9000)).shape == (80, 16)  # trimmed to one window
    with pytest.raises(ValueError, match="non-empty 1-D"):
        enc.split_windows(np.zeros(0))
    with pytest.raises(ValueError, match=r"expected mel \[N, 80, 16\]"):
        enc(torch.zeros(1, 80, 15))


def test_audio_large_v3_preset_on_meta_device():
    with torch.device("meta"):
        enc = AudioEncoder(AudioTowerConfig())
        out = enc(torch.empty(1, 128, 3000))
    assert out.shape == (1, 1500, 1280)
    assert enc.window_samples == 480_000
    assert _params(enc) == 635_048_960
    with torch.device("meta"), pytest.raises(ValueError, match="meta device"):
        AudioEncoder(AudioTowerConfig(checkpoint="large-v3"))


def _sine(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t) * np.exp(-t)).astype(np.float32)  # decaying: not periodic


def _write_wav(path, channels: list[np.ndarray], rate: int) -> None:
    pcm = (np.clip(np.stack(channels, 1), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _write_pyav(path, signal: np.ndarray, rate: int, codec: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, signal.size, 1024):
            chunk = np.ascontiguousarray(signal[start : start + 1024].reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _assert_close_signal(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    assert got.dtype == np.float32 and got.ndim == 1
    assert abs(got.size - want.size) <= 4, (got.size, want.size)
    n = min(got.size, want.size)
    np.testing.assert_allclose(got[100 : n - 100], want[100 : n - 100], atol=atol)


@pytest.mark.parametrize("rate", [16000, 44100, 8000])
def test_load_audio_wav_resamples_to_16k(tmp_path, rate):
    path = tmp_path / "a.wav"
    _write_wav(path, [_sine(rate, 1.0)], rate)
    _assert_close_signal(load_audio(path), _sine(16000, 1.0), atol=2e-3)
    _assert_close_signal(load_audio(path.read_bytes()), _sine(16000, 1.0), atol=2e-3)


def test_load_audio_stereo_downmix_matches_whisper(tmp_path):
    # ffmpeg -ac 1 to s16 (whisper.load_audio) averages channels: (L + R) / 2
    left = _sine(16000, 0.5)
    path = tmp_path / "stereo.wav"
    _write_wav(path, [left, np.zeros_like(left)], 16000)
    _assert_close_signal(load_audio(path), left / 2, atol=1e-3)


@pytest.mark.parametrize("codec, suffix, atol", [("flac", "flac", 2e-3), ("libmp3lame", "mp3", 0.08)])
@pytest.mark.parametrize("rate", [16000, 44100])
def test_load_audio_flac_mp3(tmp_path, codec, suffix, atol, rate):
    path = tmp_path / f"a.{suffix}"
    _write_pyav(path, _sine(rate, 1.0), rate, codec)
    _assert_close_signal(load_audio(path), _sine(16000, 1.0), atol=atol)


def test_load_audio_names_unreadable_source(tmp_path):
    with pytest.raises(ValueError, match=r"<9 bytes>"):
        load_audio(b"not audio")
    with pytest.raises(ValueError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    video = tmp_path / "silent.mp4"
    write_mp4(video, 2, 2, 32, 32)
    with pytest.raises(ValueError, match="silent.mp4.*no audio stream"):
        load_audio(video)

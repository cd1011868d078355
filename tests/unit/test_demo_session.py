"""The demo's UI-free parts: webcam window, energy VAD, WAV chunks, upload checks, conversation,
and the frame-feature cache that lets webcam frames be encoded before the turn is sent."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import SAMPLE_RATE, VideoSamplingConfig, load_audio
from omni.demo.session import (
    Conversation,
    FrameWindow,
    Listener,
    MediaError,
    VADConfig,
    decode_wav_chunk,
    load_upload,
    media_kind,
    model_audio,
    wav_bytes,
)
from omni.inference import with_placeholders
from omni.model.media_policy import MediaPolicy
from tests.helpers import write_mp4

POLICY = MediaPolicy(SAMPLE_RATE, 1, VideoSamplingConfig(fps=1.0, max_frames=4))  # 1-s windows, like the tiny model


def _tone(seconds: float, sr: int = SAMPLE_RATE, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _silence(seconds: float, sr: int = SAMPLE_RATE, noise: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(0).normal(0, noise, round(seconds * sr)) if noise
            else np.zeros(round(seconds * sr))).astype(np.float32)


def _feed(listener: Listener, signal: np.ndarray, sr: int, chunk_s: float = 0.1):
    """Feed like the browser does (0.1 s chunks); the utterances that ended."""
    n = round(chunk_s * sr)
    return [u for i in range(0, signal.size, n) if (u := listener.feed(signal[i:i + n], sr)) is not None]


# ---------------------------------------------------------------- webcam window
def test_frame_window_samples_at_fps_and_keeps_the_last_max_frames():
    w = FrameWindow(fps=1.0, max_frames=4)
    frames = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(20)]
    assert w.due(0.0)
    kept = [w.offer(f, 0.5 * i) for i, f in enumerate(frames)]  # the browser sends 2 frames/s
    assert not w.due(9.9) and w.due(10.5)
    assert kept == [i % 2 == 0 for i in range(20)]                # 1 fps kept
    snap = w.snapshot(now=9.6)
    assert [f.getpixel((0, 0))[0] for f in snap] == [12, 14, 16, 18]  # the last 4, oldest first
    assert (w.kept, w.dropped, w.span_s()) == (10, 6, 3.0)
    assert w.snapshot(now=9.0 + 3.5) == []                        # camera stopped: not live


def test_frame_window_tolerates_timer_jitter():
    w = FrameWindow(fps=2.0, max_frames=8)
    assert [w.offer(Image.new("RGB", (2, 2)), t) for t in (0.0, 0.499, 0.997, 1.2)] == [True, True, True, False]


# ---------------------------------------------------------------- VAD
def test_vad_closes_an_utterance_after_a_pause_and_keeps_pre_roll_and_tail():
    sr = 48_000
    cfg = VADConfig()
    signal = np.concatenate([_silence(1.0, sr, 1e-4), _tone(0.8, sr), _silence(1.5, sr, 1e-4)])
    listener = Listener("vad", cfg)
    [u] = _feed(listener, signal, sr)
    assert u.reason == "silence after speech" and u.sr == sr
    assert u.end_s == pytest.approx(1.8, abs=0.021)
    assert u.speech_s == pytest.approx(0.8, abs=0.041)
    assert u.detected_s - u.end_s == pytest.approx(cfg.end_silence_ms / 1000, abs=0.021)
    expected = (cfg.pre_roll_ms + 800 + cfg.tail_ms) / 1000
    assert u.samples.size / sr == pytest.approx(expected, abs=0.03)
    assert not listener.open and listener.finish() is None and listener.only_silence


def test_vad_sends_two_utterances_and_ignores_clicks_and_the_noise_floor():
    sr = 16_000
    click = _tone(0.04, sr)  # shorter than min_speech_ms: not speech
    noise = _silence(0.5, sr, 0.02)  # -34 dBFS hum, louder than the absolute threshold
    signal = np.concatenate([noise, noise, click, noise, _tone(0.5, sr, amp=0.8), noise, noise,
                             _tone(0.4, sr, amp=0.8), noise, noise])
    utterances = _feed(Listener("vad"), signal, sr)
    assert [round(u.speech_s, 1) for u in utterances] == [0.5, 0.4]


def test_vad_max_length_and_an_open_utterance_closed_by_stop():
    sr = 16_000
    listener = Listener("vad", VADConfig(max_utterance_s=2.0))
    [u] = _feed(listener, np.concatenate([_silence(0.4, sr), _tone(2.5, sr)]), sr)
    assert u.reason == "max length" and u.samples.size / sr == pytest.approx(2.0, abs=0.03)
    assert listener.open  # the rest of the tone opened the next one
    u2 = listener.finish()
    assert u2.reason == "recording stopped" and u.speech_s + u2.speech_s == pytest.approx(2.5, abs=0.03)


def test_vad_calibrates_on_the_first_frames_so_a_loud_start_is_the_floor():
    sr = 16_000
    hum = _tone(1.0, sr, hz=50, amp=0.05)  # -29 dBFS mains hum from the first frame on
    signal = np.concatenate([hum, hum + _tone(1.0, sr, amp=0.5), hum, hum])
    [u] = _feed(Listener("vad"), signal, sr)
    assert u.speech_s == pytest.approx(1.0, abs=0.05)
    # the price: a tone from the very first frame is the floor until a quieter frame arrives
    tone_first = np.concatenate([_tone(0.8, sr), _silence(0.8, sr), _tone(0.5, sr), _silence(0.8, sr)])
    assert [round(u.speech_s, 1) for u in _feed(Listener("vad"), tone_first, sr)] == [0.5]


def test_push_to_talk_sends_everything_on_stop_or_reports_silence():
    sr = 44_100
    listener = Listener("ptt")
    assert _feed(listener, np.concatenate([_silence(0.5, sr), _tone(0.3, sr), _silence(0.7, sr)]), sr) == []
    u = listener.finish()
    assert u.reason == "push-to-talk stop" and u.samples.size / sr == pytest.approx(1.5, abs=0.03)
    assert _feed(listener, _silence(1.0, sr, 1e-4), sr) == []
    assert listener.finish() is None and listener.only_silence
    _feed(listener, np.concatenate([_tone(0.5, sr), _silence(0.2, sr)]), sr)  # talking as it starts
    assert listener.finish().speech_s == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------- microphone chunks and audio
def _chunk_header(sr: int, channels: int, fmt: int, bits: int, data_size: int) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + struct.pack("<HHIIHH", fmt, channels, sr, sr * block, block, bits)
            + b"data" + struct.pack("<I", data_size))


def test_decode_wav_chunk_reads_samples_past_a_stale_header():
    stereo = np.stack([_tone(0.1, 48_000), -_tone(0.1, 48_000) * 0.5], axis=1)
    pcm16 = np.round(stereo * 32767).astype("<i2").tobytes()
    # the browser repeats the first chunk's header: its sizes do not match this chunk
    sr, mono = decode_wav_chunk(_chunk_header(48_000, 2, 1, 16, 4) + pcm16)
    assert sr == 48_000 and mono.shape == (4800,)
    np.testing.assert_allclose(mono, np.round(stereo * 32767).mean(axis=1) / 32768, atol=1e-6)
    sr, mono = decode_wav_chunk(_chunk_header(16_000, 1, 3, 32, 0) + _tone(0.05).astype("<f4").tobytes())
    np.testing.assert_array_equal(mono, _tone(0.05))
    with pytest.raises(MediaError, match="not WAV"):
        decode_wav_chunk(b"OggS" + bytes(100))
    with pytest.raises(MediaError, match="unsupported WAV format"):
        decode_wav_chunk(_chunk_header(16_000, 1, 1, 8, 10) + bytes(10))


def test_model_audio_resamples_like_an_uploaded_file_and_cuts_to_the_window():
    sr = 48_000
    rec = np.concatenate([_tone(1.5, sr), _silence(0.2, sr)])
    wav, notes = model_audio(rec, sr, POLICY)
    assert wav.shape == (SAMPLE_RATE,) and "recording is 1.7 s: cut to its first 1 s" in notes[0]
    np.testing.assert_array_equal(wav, load_audio(wav_bytes(rec, sr))[:SAMPLE_RATE])
    wav, notes = model_audio(_tone(0.5), SAMPLE_RATE, POLICY)
    assert wav.shape == (8000,) and notes == []
    with pytest.raises(MediaError, match="silence"):
        model_audio(_silence(1.0, sr, 1e-4), sr, POLICY)


# ---------------------------------------------------------------- uploads
def _wav_file(path, signal: np.ndarray, sr: int = SAMPLE_RATE):
    path.write_bytes(wav_bytes(signal, sr))
    return path


def test_uploads_are_decoded_like_the_processor_would_or_refused_with_a_reason(tmp_path):
    png = tmp_path / "shape.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(png)
    item = load_upload(png, POLICY)
    assert item.kind == "image" and item.value == str(png) and item.notes == []  # kept as its file

    noext = tmp_path / "photo"  # no suffix: recognised by content
    noext.write_bytes(png.read_bytes())
    assert media_kind(noext) == "image"

    short, long = tmp_path / "short.mp4", tmp_path / "long.mp4"
    write_mp4(short, 6, 2)   # 3 s at 1 fps -> 3 frames
    write_mp4(long, 40, 4)   # 10 s -> capped at 4 frames, said so
    item = load_upload(short, POLICY)
    assert (item.value, len(item.frames), item.notes) == (str(short), 3, [])
    item = load_upload(long, POLICY)
    assert len(item.frames) == 4 and "long.mp4 is 10.0 s: the model takes at most 4 frames" in item.notes[0]

    item = load_upload(_wav_file(tmp_path / "long.wav", _tone(2.5)), POLICY)
    assert item.value.shape == (SAMPLE_RATE,) and "long.wav is 2.5 s: cut to its first 1 s" in item.notes[0]

    (tmp_path / "notes.txt").write_text("not media")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (tmp_path / "broken.mp4").write_bytes(bytes(500))
    refusals = {
        "notes.txt": "is not an image, video or audio file",
        "broken.png": "cannot read this image",
        "broken.mp4": "cannot read this video",
    }
    _wav_file(tmp_path / "silent.wav", _silence(1.0))
    refusals["silent.wav"] = r"silent.wav is silent \(nothing in it reaches -60 dBFS\)"
    for name, reason in refusals.items():
        with pytest.raises(MediaError, match=reason):
            load_upload(tmp_path / name, POLICY)


# ---------------------------------------------------------------- conversation
def test_placeholders_are_added_as_omni_chat_adds_them():
    assert with_placeholders("which note is played?", {"image": 1, "audio": 1}) == "<image> <audio> which note is played?"
    assert with_placeholders("<audio> then <image>?", {"image": 1, "audio": 1, "video": 1}) == "<video> <audio> then <image>?"
    assert with_placeholders("hi", {}) == "hi"


def test_conversation_binds_each_turns_media_in_placeholder_order():
    from omni.demo.session import MediaItem

    i1, i2 = Image.new("RGB", (8, 8)), Image.new("RGB", (9, 9))
    chat = Conversation()
    chat.add_user("what colour?", [MediaItem("audio", "a1", ""), MediaItem("image", i1, "")])
    chat.turns[-1].answer = "red"
    chat.add_user("and now?", [MediaItem("video", ["f1", "f2"], ""), MediaItem("image", i2, "")])
    assert chat.messages() == [
        {"role": "user", "content": "<image> <audio> what colour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "<image> <video> and now?"},
    ]
    assert chat.media() == {"audio": ["a1"], "image": [i1, i2], "video": [["f1", "f2"]]}
    assert chat.drop_oldest() and len(chat) == 1 and not chat.drop_oldest()


# ---------------------------------------------------------------- frames encoded ahead
def test_frame_cache_returns_the_towers_output_and_serves_frames_encoded_ahead(tiny_model):
    from omni.demo.engine import FrameFeatureCache

    model, _ = tiny_model
    tower = model.encoders["image"]
    cache = FrameFeatureCache(tower, capacity=3)
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8)) for i in range(4)]
    pixels = tower.preprocess(frames)
    with torch.no_grad():
        expected = tower(pixels)
        assert torch.equal(cache(pixels), expected) and (cache.hits, cache.misses) == (0, 4)
        for i in range(4):  # one at a time, as the webcam delivers them; capacity 3 evicts frame 0
            assert cache.encode_ahead(pixels[i:i + 1]) == 1
        assert cache.encode_ahead(pixels[3:]) == 0
        got = cache(pixels)
    assert (cache.hits, cache.misses) == (3, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # batch-of-1 vs batch-of-4 rounding
    assert cache.num_patches == tower.num_patches and cache.out_dim == tower.out_dim


def test_engine_drops_the_oldest_turns_to_fit_the_context_and_times_the_turn(tiny_model, tmp_path):
    import time

    from omni.demo.engine import DemoEngine, TurnStats
    from omni.demo.session import MediaItem
    from omni.errors import SampleError

    model, tok = tiny_model
    model.save_pretrained(tmp_path / "model", tok)
    engine = DemoEngine(tmp_path / "model", max_new_tokens=3)
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)) for i in range(4)]
    for f in frames:  # as the webcam delivers them
        engine.encode_ahead(f)
    chat = Conversation()
    for _ in range(16):  # 16 x (64 video tokens + text) > the tiny LLM's 1024 positions
        chat.add_user("what colour is the shape?", [MediaItem("video", frames, "")])
        chat.turns[-1].answer = "red"
    chat.add_user("and now?", [MediaItem("video", frames, "")])
    stats = TurnStats()
    list(engine.answer(chat, stats, time.perf_counter()))
    assert stats.dropped > 0 and len(chat) == 17 - stats.dropped and chat.turns[-1].text == "<video> and now?"
    assert 0 < stats.prompt_tokens <= 1024 and 1 <= stats.tokens <= 3 and 0 < stats.ttft_s <= stats.total_s
    assert stats.frames == 4 * len(chat) == stats.frames_ahead  # every frame came from the cache

    alone = Conversation()
    alone.add_user("so many?", [MediaItem("image", frames[0], "")] * 70)  # 70 x 16 tokens
    with pytest.raises(SampleError, match="exceeds max_length"):
        list(engine.answer(alone, TurnStats(), time.perf_counter()))


def test_omni_demo_command_and_the_model_it_serves(tmp_path, monkeypatch):
    import argparse

    from omni.cli import demo
    from omni.demo import app

    parser = argparse.ArgumentParser()
    demo.add_demo_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--model", "m", "--port", "9000"])
    assert (args.model, args.host, args.port, args.share, args.func) == ("m", "127.0.0.1", 9000, False, demo._demo)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(app, "QUICKSTART_MODEL", Path("nowhere/final"))
    with pytest.raises(SystemExit, match="run `make quickstart`"):
        app.resolve_model_dir(None)
    with pytest.raises(SystemExit, match="not a model folder"):
        app.resolve_model_dir(str(tmp_path))
    (tmp_path / "nowhere/final").mkdir(parents=True)
    (tmp_path / "nowhere/final/omni_config.json").write_text("{}")
    assert app.resolve_model_dir(None) == Path("nowhere/final")

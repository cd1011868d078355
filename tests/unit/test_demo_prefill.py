"""The demo's LLM prefill while the user speaks (DemoEngine.prefill_ahead, Session.prefill_ahead):
the answer is the one of the turn run entirely after speech, and only what was not known while
speaking runs after it: camera frames that change mid-utterance, speech shorter than one audio
window, a turn cut short, and the next turn of the chat."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from omni.demo.engine import DemoEngine, TurnStats
from omni.demo.session import Conversation, FrameWindow, MediaItem
from omni.model.prompt_cache import PromptCache

SR = 16000


def _speech(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """A tone with noise (no two audio windows alike), loud enough for the VAD and the media policy."""
    t = np.arange(round(seconds * sr)) / sr
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32)


def _frame(i: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(100 + i).integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    folder = tmp_path_factory.mktemp("prefill") / "model"
    model.save_pretrained(folder, tok)
    return DemoEngine(folder, max_new_tokens=4)


def _forget_ahead(engine: DemoEngine) -> None:
    """Nothing computed ahead is left: the turn runs entirely after speech."""
    for memo in (engine.frame_cache._cache, engine.audio_cache._cache, *engine.processor._memo.values()):
        memo.clear()


def _answer(engine, chat, cache=None, stats=None):
    return "".join(engine.answer(chat, stats or TurnStats(), time.perf_counter(), prompt_cache=cache))


def _after_speech(engine, chat) -> str:
    _forget_ahead(engine)
    return _answer(engine, chat)


def test_frames_changing_while_the_user_speaks_are_prefilled_again_and_the_answer_is_the_same(engine):
    window = FrameWindow(fps=1.0, max_frames=engine.video.max_frames)
    for i in range(window.max_frames):  # the camera ran before the user spoke
        window.offer(_frame(i), float(i))
    speech, cache, chat = _speech(2.5), PromptCache(), Conversation()
    t0 = float(window.max_frames)
    for end in range(1600, speech.size + 1, 1600):  # 100 ms microphone chunks
        now = t0 + end / SR
        window.offer(_frame(int(now) + 100), now)  # a new frame each second pushes the oldest out
        engine.prefill_ahead(cache, chat, window.snapshot(now), speech[:end])
    frames = window.snapshot(now)
    assert window.kept == window.max_frames + 3  # three frames arrived mid-utterance
    held = len(cache)
    chat.add_user("what do you see and hear?", [MediaItem("video", frames, ""), MediaItem("audio", speech, "")])
    stats = TurnStats()
    ahead = _answer(engine, chat, cache, stats)
    # everything up to the last whole audio window (after the latest frames) came from the cache
    assert stats.prompt_tokens - stats.prefilled == held
    assert 0 < stats.prefilled < stats.prompt_tokens - engine.video.max_frames * engine.processor.frame_tokens
    assert ahead == _after_speech(engine, chat)


def test_speech_shorter_than_one_window_prefills_the_frames(engine):
    frames = [_frame(i) for i in range(engine.video.max_frames)]
    speech, cache, chat = _speech(0.6, seed=1), PromptCache(), Conversation()
    for end in range(1600, speech.size + 1, 1600):
        engine.prefill_ahead(cache, chat, frames, speech[:end])
    video_end = len(cache)
    assert video_end > engine.video.max_frames * engine.processor.frame_tokens
    chat.add_user("and now?", [MediaItem("video", frames, ""), MediaItem("audio", speech, "")])
    stats = TurnStats()
    assert _answer(engine, chat, cache, stats) == _after_speech(engine, chat)
    assert stats.prompt_tokens - stats.prefilled == video_end


def test_a_turn_cut_short_empties_the_cache_and_the_next_turn_reuses_the_chat(engine):
    frames = [_frame(i) for i in range(engine.video.max_frames)]
    cache, chat = PromptCache(), Conversation()
    engine.prefill_ahead(cache, chat, frames, _speech(1.2, seed=2))
    chat.add_user("what is it?", [MediaItem("video", frames, "")])
    pieces = engine.answer(chat, TurnStats(), time.perf_counter(), max_new_tokens=64, prompt_cache=cache)
    next(pieces)
    pieces.close()  # the reader went away (tab closed, a new turn): decoding stops, nothing half-done is kept
    assert len(cache) == 0 and cache.kv is None
    assert engine.prefill_ahead(cache, chat, frames, None) > 0 and len(cache) > 0  # the engine is free again

    first = TurnStats()
    chat.turns[-1].answer = _answer(engine, chat, cache, first).strip() or "ok"
    chat.add_user("and the colour?", [])
    second = TurnStats()
    reused = _answer(engine, chat, cache, second)
    assert second.prompt_tokens - second.prefilled >= first.prompt_tokens - 1  # the first turn's prompt, from the cache
    assert reused == _after_speech(engine, chat)


def test_the_apps_path_a_48_khz_microphone_prefilled_while_speaking_and_during_the_vads_pause(engine, tmp_path):
    """Session.prefill_ahead as the app calls it on each microphone chunk: the recording so far,
    resampled, gives the same whole audio windows as the finished utterance, and during the
    pause the VAD waits for, the utterance that pause ends is prefilled whole."""
    from omni.demo.sessions import Session

    session = Session(tmp_path, engine.policy, engine.processor.image_config["image_size"])
    sr, now = 48000, 0.0
    quiet = np.random.default_rng(4).normal(0, 1e-3, sr).astype(np.float32)  # room noise, -60 dBFS
    signal = np.concatenate([quiet[: sr // 2], _speech(2.4, sr, seed=3), quiet])
    utterance, calls = None, []
    _forget_ahead(engine)
    for i in range(0, signal.size, sr // 10):  # 0.1-s chunks; the camera sends a frame every 0.5 s
        if i % (sr // 2) == 0:
            session.offer_frame(_frame(i), now, engine.encode_ahead)
        utterance = utterance or session.listener.feed(signal[i:i + sr // 10], sr)
        if utterance is None:
            calls.append(session.prefill_ahead(True, now, engine.prefill_ahead) > 0)
        now += 0.1
    assert utterance is not None and utterance.reason == "silence after speech"
    assert sum(calls) >= 4  # new frames, each whole window, the utterance at the pause
    held, hits, misses = len(session.prompt_cache), engine.audio_cache.hits, engine.audio_cache.misses
    frames = session.window.snapshot(now)
    items, errors = session.items([], frames, "camera", utterance)
    assert not errors and len(frames) == engine.video.max_frames
    session.add_turn("what do you hear?", items)
    stats = TurnStats()
    answer = "".join(engine.answer(session.chat, stats, time.perf_counter(), prompt_cache=session.prompt_cache))
    # all three audio windows (the last one partial) ran while the VAD waited; so did the LLM up to them
    assert (engine.audio_cache.hits - hits, engine.audio_cache.misses - misses) == (3, 0)
    ids = engine.generator.prompt(session.chat.messages(), session.chat.media()).input_ids
    after_media = len(ids) - 1 - int(np.flatnonzero(np.isin(ids.numpy(), list(engine.model.token_ids.values()))).max())
    assert stats.prompt_tokens - stats.prefilled == held and stats.prefilled == after_media  # the text, closing tokens
    assert answer == _after_speech(engine, session.chat)
    session.close("done")
    assert len(session.prompt_cache) == 0

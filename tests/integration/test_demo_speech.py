"""The demo's spoken answers without a browser: the talker's frames streamed in chunks are its
non-streaming greedy codes, and the chunks' audio, concatenated, is the whole answer's speech
(as long as decoding it at once, heard as the same word); a turn through the demo's own callback
sends WAV chunks to the streaming audio output, and none when switched off or without a talker.
The model: the trained tiny model with a talker fitted briefly to say one word for its answer
(the `speaking_tiny` fixture, bench/inference.py `give_voice`)."""
from __future__ import annotations

import io
import math
import shutil
import time
import wave

import gradio as gr
import numpy as np
import pytest
import torch

from tests.conftest import SPEAKING_QUESTION
from tests.helpers import load_bench

MAX_NEW_TOKENS = 6


def _chat(img):
    from omni.demo.session import Conversation, MediaItem

    chat = Conversation()
    chat.add_user(SPEAKING_QUESTION, [MediaItem("image", str(img), str(img))])
    return chat


def test_streamed_chunks_are_the_talkers_codes_and_its_audio(speaking_tiny):
    from omni.demo.engine import DemoEngine, TurnStats
    from omni.model.speech import answer_states, speak
    from omni.speech.match import nearest_word
    from omni.speech.synth import speak as synthesise

    folder, img, answer = speaking_tiny
    bench = load_bench("inference")
    engine = DemoEngine(folder, max_new_tokens=MAX_NEW_TOKENS)
    assert engine.speaks
    model, codec = engine.model, engine.model.codec
    chat, stats = _chat(img), TurnStats()
    assert "".join(engine.answer(chat, stats, time.perf_counter())).strip() == answer
    chunks = list(engine.speak(chat.messages(), chat.media(), answer, stats, time.perf_counter()))
    codes = torch.cat([c.codes for c in chunks], dim=1)
    whole = speak(model, answer_states(engine.generator, [chat.messages()], [chat.media()], [answer]),
                  model.config.talker.max_frames)[0]
    assert torch.equal(codes, whole.cpu())  # frame for frame the non-streaming talker's greedy codes
    first, every = engine.speech_chunks
    assert len(chunks) >= 3 and codes.shape[1] > first + every
    assert [c.codes.shape[1] for c in chunks[:-1]] == [first] + [every] * (len(chunks) - 2)
    assert chunks[-1].codes.shape[1] <= every
    assert all(c.wave.size for c in chunks)

    streamed = np.concatenate([c.wave for c in chunks])
    decoded = codec.decode(codes)
    assert streamed.size == decoded.size  # the chunks cover the whole answer, no sample lost or repeated
    assert np.sqrt(np.mean(streamed ** 2)) > 0.01  # speech, not silence
    words = {w: synthesise(w, codec.sample_rate) for w in bench.VOICE_WORDS}
    assert nearest_word(decoded, words, codec.sample_rate)[0] == bench.SPOKEN  # the talker says its word
    assert nearest_word(streamed, words, codec.sample_rate)[0] == bench.SPOKEN  # and chunked it still does
    assert stats.audio_chunks == len(chunks) and math.isfinite(stats.first_audio_s)
    assert stats.audio_s == pytest.approx(streamed.size / codec.sample_rate)
    assert "first audio" in stats.line()


def _turn(engine, img, speak: bool):
    """One typed turn through the demo's own callback (the function Gradio calls): its yields, and
    the page's "speak the answer" switch."""
    from omni.demo.app import build_app

    demo = build_app(engine=engine)
    [new_session] = [d.fn for d in demo.fns.values() if getattr(d.fn, "__name__", "") == "new_session"]
    [respond] = [d.fn for d in demo.fns.values() if getattr(d.fn, "__name__", "") == "respond"]
    [switch] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "omni-speak"]
    session = new_session(gr.Request(session_hash="tab"))
    box = {"text": SPEAKING_QUESTION, "files": [str(img)]}
    return list(respond(session, box, MAX_NEW_TOKENS, False, False, speak)), switch


def test_a_turn_streams_wav_chunks_only_when_the_model_speaks_and_the_switch_is_on(speaking_tiny, trained_tiny):
    from omni.demo.engine import DemoEngine

    folder, img, answer = speaking_tiny
    voiced = DemoEngine(folder, max_new_tokens=MAX_NEW_TOKENS)
    outputs, switch = _turn(voiced, img, speak=True)
    assert switch.visible and switch.value == bool(shutil.which("ffmpeg"))  # off, saying why, without ffmpeg
    audio = [out[3] for out in outputs if isinstance(out[3], bytes)]
    assert len(audio) >= 2  # the first chunk, then more
    for data in audio:
        with wave.open(io.BytesIO(data)) as w:
            assert (w.getframerate(), w.getnchannels()) == (voiced.model.codec.sample_rate, 1) and w.getnframes() > 0
    last = outputs[-1]
    assert last[0][-1]["content"] == answer and "first audio" in last[2] and not isinstance(last[3], bytes)

    outputs, _ = _turn(voiced, img, speak=False)
    assert not any(isinstance(out[3], bytes) for out in outputs) and "first audio" not in outputs[-1][2]

    plain = DemoEngine(trained_tiny, max_new_tokens=MAX_NEW_TOKENS)  # no talker: as before, no switch, no audio
    outputs, switch = _turn(plain, img, speak=True)
    assert not plain.speaks and not switch.visible
    assert not any(isinstance(out[3], bytes) for out in outputs)
    assert outputs[-1][0][-1]["content"] == answer and "first audio" not in outputs[-1][2]

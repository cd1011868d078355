"""espeak-ng renderings and the DTW word matcher the codec tests and the talker's eval score with."""
import numpy as np
import pytest

from omni.speech.match import nearest_word
from omni.speech.synth import SpeechSynthError, speak
from omni.tiny_world import COLOURS, NOTES, NUMBERS

RATE = 16_000


def test_speak_renders_a_word_at_the_asked_rate():
    wave = speak("purple", RATE)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.2 * RATE < len(wave) < 2 * RATE  # one word
    assert np.abs(wave).max() > 0.05  # not silence
    slow = speak("purple", RATE, words_per_minute=100)
    assert len(slow) > 1.2 * len(wave)


def test_speak_without_espeak_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SpeechSynthError, match="make speech-synth"):
        speak("red", RATE)


def test_matcher_hears_slower_speech_as_the_same_word():
    candidates = {w: speak(w, RATE) for w in COLOURS + NOTES + NUMBERS}
    for word in ("yellow", "mi", "seven", "two"):
        said, costs = nearest_word(speak(word, RATE, words_per_minute=110), candidates, RATE)
        assert said == word, (word, sorted(costs.items(), key=lambda kv: kv[1])[:3])


def test_matcher_needs_candidates():
    with pytest.raises(ValueError, match="no candidate words"):
        nearest_word(np.zeros(RATE, np.float32), {}, RATE)

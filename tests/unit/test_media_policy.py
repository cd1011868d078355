"""The one media policy (omni/model/media_policy.py) on real files: long speech-like recordings are
cut to the model's audio windows with a note, silence and faint noise are refused with one line, long
videos get their frames spread with a note, and media never push a prompt past the context."""
from __future__ import annotations

import wave
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from encoders import SAMPLE_RATE, load_audio
from omni.errors import SampleError
from omni.inference import load_media
from omni.model.media_policy import SILENCE_DBFS, MediaPolicy, MediaRefused, PromptTooLong
from omni.model.processor import OmniProcessor
from omni.presets import build_preset
from tests.helpers import write_mp4

RATE = 44_100


def _speech_like(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Voiced 'syllables' (a 110-220 Hz glottal pulse train's harmonics shaped by two formants)
    of 0.15-0.4 s with short pauses, like speech's envelope; float in [-1, 1]."""
    rng = np.random.default_rng(seed)
    out, n = [], round(seconds * rate)
    total = 0
    while total < n:
        dur = int(rng.uniform(0.15, 0.4) * rate)
        t = np.arange(dur) / rate
        f0 = rng.uniform(110, 220)
        f1, f2 = rng.uniform(300, 900), rng.uniform(900, 2500)
        syl = sum(np.sin(2 * np.pi * k * f0 * t) / k
                  * (np.exp(-((k * f0 - f1) / 200) ** 2) + 0.5 * np.exp(-((k * f0 - f2) / 300) ** 2))
                  for k in range(1, int(4000 / f0)))
        syl *= np.hanning(dur) * rng.uniform(0.2, 0.6) / max(1e-9, np.abs(syl).max())
        pause = np.zeros(int(rng.uniform(0.05, 0.3) * rate))
        out += [syl, pause]
        total += dur + pause.size
    return np.concatenate(out)[:n]


def _write_wav(path, left: np.ndarray, right: np.ndarray | None = None, rate: int = RATE):
    """16-bit PCM WAV, stereo when `right` is given (what a phone or a DAW writes)."""
    channels = [left] if right is None else [left, right]
    pcm = (np.clip(np.stack(channels, 1), -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(len(channels)), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def tok_ids(tiny_model):
    model, tok = tiny_model
    return model.config, tok, model.token_ids


@pytest.fixture(scope="module")
def proc(tok_ids):
    cfg, tok, ids = tok_ids
    return OmniProcessor.from_config(cfg, tok, ids)


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _audio_tokens(proc, ex) -> int:
    return int((ex.input_ids == proc.token_ids["audio"]).sum())


@pytest.mark.parametrize("seconds", [45, 90])
def test_long_recordings_are_cut_to_the_models_windows_with_a_note(proc, tmp_path, seconds):
    """`omni chat --audio long.wav` read every window: 45 s became ~595 prompt tokens without a word,
    90 s passed the tiny model's 1024 positions. Now both are cut to audio.max_windows, and said so."""
    speech = _speech_like(seconds)
    path = _write_wav(tmp_path / f"talk{seconds}.wav", speech, 0.8 * speech[::-1])
    media = load_media(audios=[path])  # what omni chat and omni eval decode with
    assert media["audio"][0].size == seconds * SAMPLE_RATE
    ex = proc(_ask("<audio> what is said?"), media, add_generation_prompt=True)
    limit = proc.policy.max_windows
    assert limit == build_preset("tiny").audio.max_windows == 4
    assert ex.media.audio.shape[0] == limit                    # 4 windows of 1 s read, not 45 or 90
    assert _audio_tokens(proc, ex) == limit * proc._audio_projector.num_tokens(proc._audio.valid_frames(16_000))
    assert len(ex.input_ids) < 100 <= proc.max_length
    assert ex.notes == [f"audio 1 is {seconds:.1f} s: cut to its first 4 s (the model reads at most 4 audio "
                        "window(s) of 1 s)"]


def test_media_never_push_a_prompt_past_the_context_they_are_refused_in_one_line(tok_ids, tmp_path):
    cfg, tok, ids = tok_ids
    roomy = OmniProcessor.from_config(build_preset("tiny", ["audio.max_windows=120"]), tok, ids)
    wav = load_audio(_write_wav(tmp_path / "talk.wav", _speech_like(90)))
    with pytest.raises(PromptTooLong) as err:
        roomy(_ask("<audio> what is said?"), {"audio": [wav]}, add_generation_prompt=True)
    line = str(err.value)
    assert "\n" not in line and isinstance(err.value, SampleError)
    assert line.startswith("sequence of ") and "exceeds max_length 1024" in line
    assert "the media take 1170 of them (audio 1170)" in line   # 90 windows x 13 tokens


@pytest.mark.parametrize("make,kind", [
    (lambda n: np.zeros(n), "digital silence"),
    (lambda n: np.random.default_rng(0).normal(0, 10 ** (-75 / 20), n), "noise at -75 dBFS"),
    (lambda n: np.random.default_rng(0).normal(0, 10 ** (-62 / 20), n), "noise at -62 dBFS"),
])
def test_silence_and_faint_noise_are_refused_before_any_model_runs(proc, tmp_path, make, kind):
    n = 3 * RATE
    path = _write_wav(tmp_path / "quiet.wav", make(n), make(n))
    wav = load_media(audios=[path])["audio"][0]
    with pytest.raises(MediaRefused, match=r"^audio 1 is silent \(nothing in it reaches -60 dBFS\)"):
        proc(_ask("<audio> which note is played?"), {"audio": [wav]}, add_generation_prompt=True)


def test_a_quiet_but_real_sound_passes_and_the_blanked_control_still_works(proc, tmp_path):
    speech = _speech_like(2.0) * 10 ** (-40 / 20) / 0.6    # peaks around -40 dBFS
    wav = load_media(audios=[_write_wav(tmp_path / "soft.wav", speech)])["audio"][0]
    ex = proc(_ask("<audio> what is said?"), {"audio": [wav]}, add_generation_prompt=True)
    assert ex.notes == [] and ex.media.audio.shape[0] == 2
    blank = proc(_ask("<audio> what is said?"), {"audio": [wav]}, add_generation_prompt=True, blank=True)
    assert np.array_equal(blank.input_ids, ex.input_ids)   # omni eval's control: same tokens, no sound
    assert not np.array_equal(blank.media.audio, ex.media.audio)


def test_training_skips_and_counts_a_silent_sample_like_any_bad_one(proc, tmp_path):
    from omni.data.loader import SkipCounter
    from omni.data.records import sft_example
    from omni.data.stream import RecordStream

    def record(i: int, signal: np.ndarray) -> dict:
        wav = _write_wav(tmp_path / f"{i}.wav", signal, rate=SAMPLE_RATE).read_bytes()
        return {"__where__": f"train.jsonl:{i}", "__media__": {"0.wav": wav},
                "messages": [{"role": "user", "content": "<audio> which note is played?"},
                             {"role": "assistant", "content": "do"}]}

    tone = 0.5 * np.sin(2 * np.pi * 262 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)
    records = [record(0, tone), record(1, np.zeros(SAMPLE_RATE)), record(2, tone)]
    counter = SkipCounter()
    stream = RecordStream(records, seed=0, make=lambda rec: sft_example(proc, rec), counter=counter)
    assert len(stream.take(4)) == 4 and counter.skipped >= 1
    assert all("train.jsonl:1" in r and "audio 1 is silent" in r for r in counter.reasons)


def test_long_videos_at_odd_sizes_and_rates_get_their_frames_spread_with_a_note(proc, tmp_path):
    long, short = tmp_path / "long.mp4", tmp_path / "short.mp4"
    write_mp4(long, 450, Fraction(15, 2), width=40, height=30)    # 60 s at 7.5 fps, 40 x 30 px
    write_mp4(short, 15, Fraction(15, 2), width=40, height=30)    # 2 s: 2 frames at 1 fps
    ex = proc(_ask("<video> <video> what changes?"), {"video": [str(long), str(short)]}, add_generation_prompt=True)
    assert ex.media.video_frames == [4, 2]
    assert ex.notes == ["video 1 is 60.0 s: the model takes at most 4 frames, so 4 were spread evenly over it "
                        "instead of 1 per second"]
    frames = [Image.new("RGB", (40, 30), (i * 20, 0, 0)) for i in range(10)]   # e.g. a camera window
    ex = proc(_ask("<video> what changes?"), {"video": [frames]}, add_generation_prompt=True)
    assert ex.media.video_frames == [4] and ex.notes == ["video 1 has 10 frames: the model takes at most 4, "
                                                         "spread evenly over them"]


def test_the_policy_travels_with_the_processor_config_and_older_configs_get_the_default(proc, tok_ids):
    _, tok, _ = tok_ids
    configs = proc.configs()
    assert configs["audio_config"]["max_windows"] == 4
    assert OmniProcessor(tok, **configs).policy == proc.policy       # an export's processor_config.json
    older = {**configs, "audio_config": {k: v for k, v in configs["audio_config"].items() if k != "max_windows"}}
    assert OmniProcessor(tok, **older).policy.max_windows == 8       # AudioTowerConfig's default
    policy = MediaPolicy(16_000, 2, proc.policy.video)
    assert "at most 2 window(s) of 1 s = 2 s per clip" in policy.describe() and SILENCE_DBFS == -60

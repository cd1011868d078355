"""Spoken words for the tiny world, rendered by Debian's espeak-ng (`make speech-synth` installs it).

A real synthesiser rather than tones, so the tiny codec and the talker are trained and checked on
speech; the CLI is run without a shell and its WAV is resampled to the codec's rate.
"""
from __future__ import annotations

import io
import shutil
import subprocess

import librosa
import numpy as np
import soundfile

ESPEAK = "espeak-ng"


class SpeechSynthError(RuntimeError):
    """espeak-ng is missing or failed; the message says what to do."""


def speak(text: str, sample_rate: int, voice: str = "en", words_per_minute: int = 160) -> np.ndarray:
    """`text` spoken by espeak-ng as a mono float32 wave at `sample_rate` (espeak-ng's own rate is 22050 Hz)."""
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise SpeechSynthError(f"{ESPEAK} is not installed: run `make speech-synth` "
                               "(or `apt-get install -y espeak-ng`) to render spoken audio")
    if not text.strip():
        raise SpeechSynthError("speak: the text is empty; give at least one word to render")
    done = subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "--stdout", text],
                          capture_output=True, check=False)
    if done.returncode != 0 or not done.stdout:
        raise SpeechSynthError(f"{ESPEAK} failed on {text!r} (voice {voice!r}): "
                               f"{done.stderr.decode(errors='replace').strip() or 'no audio written'}")
    wave, rate = soundfile.read(io.BytesIO(done.stdout), dtype="float32")
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    return librosa.resample(wave, orig_sr=rate, target_sr=sample_rate).astype(np.float32)

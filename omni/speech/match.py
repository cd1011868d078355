"""Which word was said: dynamic time warping over log-mel frames against a rendering of every
candidate word (the tiny codec's round-trip test, later the talker's eval)."""
from __future__ import annotations

import librosa
import numpy as np

N_MELS = 40
TRIM_DB = 40  # quieter than the loudest frame by this much counts as the silence around a word


def log_mel(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """[n_mels, frames] log-mel (dB below the loudest bin, so loudness-independent) of the spoken part of `wave`."""
    spoken, _ = librosa.effects.trim(wave, top_db=TRIM_DB)
    mel = librosa.feature.melspectrogram(y=spoken, sr=sample_rate, n_fft=512, hop_length=sample_rate // 100,
                                         n_mels=N_MELS)
    return librosa.power_to_db(mel, ref=np.max, top_db=80.0)


def dtw_cost(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance (dB) along the best alignment of two [n_mels, frames] sequences."""
    cost, path = librosa.sequence.dtw(X=a, Y=b, metric="euclidean")
    return float(cost[-1, -1] / len(path))


def nearest_word(wave: np.ndarray, candidates: dict[str, np.ndarray], sample_rate: int) -> tuple[str, dict[str, float]]:
    """The candidate word whose rendering is nearest to `wave` by DTW, and every candidate's cost."""
    return nearest_mel(log_mel(wave, sample_rate), {word: log_mel(ref, sample_rate) for word, ref in candidates.items()})


def nearest_mel(heard: np.ndarray, candidates: dict[str, np.ndarray]) -> tuple[str, dict[str, float]]:
    """`nearest_word` on log-mels (`log_mel`) already computed: many utterances against the same candidates."""
    if not candidates:
        raise ValueError("nearest_word: no candidate words to compare against")
    costs = {word: dtw_cost(heard, ref) for word, ref in candidates.items()}
    return min(costs, key=costs.get), costs

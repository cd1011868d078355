"""The codecs behind the talker: the tiny codec keeps a spoken word recognisable through encode ->
decode, and the pretrained (Mimi) route loads with transformers and round-trips shapes."""
import numpy as np
import pytest
import torch
from transformers import MimiConfig, MimiModel, Qwen2Config

from omni.speech.match import nearest_word
from omni.speech.mimi_codec import MimiCodec
from omni.speech.synth import speak
from omni.speech.tiny_codec import TinyCodec, TinyCodecConfig
from omni.tiny_world import COLOURS, NOTES, NUMBERS, SHAPES
from tests.helpers import TINY_MIMI

RATE = TinyCodecConfig().sample_rate
WORDS = COLOURS + NOTES + NUMBERS


@pytest.fixture(scope="module")
def spoken():
    """Every candidate word rendered alone, and a corpus of sentences to fit the codebooks on."""
    words = {w: speak(w, RATE) for w in WORDS}
    sentences = [f"the {s} is {c}" for s in SHAPES for c in COLOURS]
    sentences += [f"{n} and {m}" for n, m in zip(NUMBERS, NOTES + NOTES)]
    return words, [speak(s, RATE) for s in sentences]


@pytest.fixture(scope="module")
def codec(spoken):
    return TinyCodec.fit(spoken[1], TinyCodecConfig())


def test_tiny_codec_round_trip_keeps_the_word(spoken, codec):
    words, _ = spoken
    for word in COLOURS:
        codes = codec.encode(words[word])
        assert codes.dtype == torch.long and codes.shape[0] == codec.codebooks == 4
        assert codes.shape[1] == 1 + len(words[word]) // codec.config.hop_length
        assert 0 <= int(codes.min()) and int(codes.max()) < codec.codebook_size
        back = codec.decode(codes)
        assert back.dtype == np.float32 and abs(len(back) - len(words[word])) <= codec.config.hop_length
        said, costs = nearest_word(back, words, RATE)
        assert said == word, (word, sorted(costs.items(), key=lambda kv: kv[1])[:3])


def test_each_residual_codebook_brings_the_frames_closer(spoken, codec):
    words, _ = spoken
    frames = np.concatenate([codec.log_mel(words[w]) for w in NOTES])
    codes = np.concatenate([codec.encode(words[w]).numpy() for w in NOTES], axis=1)
    errors, rebuilt = [], np.zeros_like(frames)
    for book, idx in zip(codec.centroids, codes):
        rebuilt = rebuilt + book[idx]
        errors.append(float(((frames - rebuilt) ** 2).mean()))
    assert all(later < 0.9 * earlier for earlier, later in zip(errors, errors[1:])), errors


def test_tiny_codec_saves_and_loads(spoken, codec, tmp_path):
    codec.save(tmp_path / "codec")
    again = TinyCodec.load(tmp_path / "codec")
    assert again.config == codec.config
    assert torch.equal(again.encode(spoken[0]["red"]), codec.encode(spoken[0]["red"]))


def test_tiny_codec_refuses_too_little_audio_and_bad_codes(tmp_path):
    with pytest.raises(ValueError, match="cannot fit 64 centroids"):
        TinyCodec.fit([np.zeros(RATE // 10, np.float32)])
    small = TinyCodec(TinyCodecConfig(codebooks=2, codebook_size=4, n_mels=8),
                      np.zeros((2, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        small.decode(torch.tensor([[0, 4], [1, 1]]))
    with pytest.raises(ValueError, match=r"must be \[2, frames\]"):
        small.decode(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="tiny_codec.json is missing"):
        TinyCodec.load(tmp_path)




@pytest.fixture(scope="module")
def tiny_mimi(tmp_path_factory):
    """A random-init Mimi of the real class, saved the way a hub checkpoint is."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-mimi")
    MimiModel(MimiConfig(**TINY_MIMI)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("codebooks", [None, 2])
def test_mimi_codec_round_trips_shapes(tiny_mimi, codebooks):
    codec = MimiCodec(tiny_mimi, codebooks=codebooks)
    assert codec.sample_rate == 24_000 and codec.codebook_size == 64
    assert codec.codebooks == (codebooks or 4)
    samples_per_frame = round(codec.sample_rate / codec.frame_rate)
    wave = np.random.default_rng(0).standard_normal(24_000).astype(np.float32) * 0.1
    codes = codec.encode(wave)
    frames = -(-len(wave) // samples_per_frame)
    assert codes.dtype == torch.long and codes.shape == (codec.codebooks, frames)
    assert 0 <= int(codes.min()) and int(codes.max()) < codec.codebook_size
    back = codec.decode(codes)
    assert back.dtype == np.float32 and back.shape == (frames * samples_per_frame,)
    with pytest.raises(ValueError, match=r"must be \[%d, frames\]" % codec.codebooks):
        codec.decode(codes[:1] if codec.codebooks > 1 else codes.repeat(2, 1))


def test_mimi_codec_names_a_checkpoint_that_is_not_mimi(tiny_mimi, tmp_path):
    Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'qwen2' model, not a Mimi codec"):
        MimiCodec(str(tmp_path))
    with pytest.raises(ValueError, match=r"codebooks must be in 1\.\.4"):
        MimiCodec(tiny_mimi, codebooks=5)

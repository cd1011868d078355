"""Chunked decoding (omni/speech/stream.py): however the frames are cut into chunks, the audio,
concatenated, is as long as the whole grid decoded at once and is the same speech (the tiny codec,
fitted on espeak-ng words; the DTW word matcher hears the same word)."""
import numpy as np
import pytest
import torch

from omni.speech.match import nearest_word
from omni.speech.stream import ChunkDecoder
from omni.speech.synth import speak
from omni.speech.tiny_codec import TinyCodec, TinyCodecConfig

WORDS = ("orange", "purple", "seven", "green")


@pytest.fixture(scope="module")
def codec_and_words():
    config = TinyCodecConfig(codebook_size=32)
    words = {w: speak(w, config.sample_rate) for w in WORDS}
    return TinyCodec.fit(list(words.values()), config), words


@pytest.mark.parametrize("cuts", [(10, 30), (4, 1, 1, 2, 7), (1, 2)])
def test_chunks_concatenated_are_the_whole_decoding(codec_and_words, cuts):
    codec, words = codec_and_words
    codes = codec.encode(words["orange"])
    decoder, out, start = ChunkDecoder(codec), [], 0
    while start < codes.shape[1]:
        size = cuts[min(len(out), len(cuts) - 1)]
        out.append(decoder.push(codes[:, start:start + size]))
        start += size
    out.append(decoder.flush())
    streamed = np.concatenate(out)
    assert streamed.size == codec.decode(codes).size
    assert nearest_word(streamed, words, codec.sample_rate)[0] == "orange"


def test_bad_chunks_are_refused(codec_and_words):
    codec, _ = codec_and_words
    with pytest.raises(ValueError, match="codes must be"):
        ChunkDecoder(codec).push(torch.zeros(codec.codebooks + 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="context >= overlap"):
        ChunkDecoder(codec, context=2, overlap=3)

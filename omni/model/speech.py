"""The talker part of an OmniModel (docs/speech_out.md): building it from the preset's `talker:`
section, its codec (fitted and kept in the model folder for the tiny codec, loaded by name for
Mimi), what the thinker hands it (hidden states and embeddings of the answer tokens; the torch-only
steps, which exports ship, are in talking.py), its training loss and its spoken answers."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from encoders import load_audio
from encoders.audio import SAMPLE_RATE
from omni.config import ConfigError
from omni.model.fusion import IGNORE
from omni.model.processor import collate as collate_examples
from omni.model.processor import last_span
from omni.model.talking import speak, talker_batch, thinker_states
from omni.presets import ModelConfig, TalkerSection
from omni.speech.codec import Codec
from omni.speech.delay import delay, pad_id
from omni.speech.stream import ChunkDecoder
from omni.speech.talker import Talker, TalkerConfig
from omni.speech.tiny_codebook import CONFIG_FILE


def build_talker(section: TalkerSection, thinker_hidden_size: int) -> Talker:
    return Talker(TalkerConfig(hidden_size=section.hidden_size, layers=section.layers, heads=section.heads,
                               kv_heads=section.kv_heads, intermediate_size=section.intermediate_size,
                               max_positions=section.max_positions, codebooks=section.codebooks,
                               codebook_size=section.codebook_size), thinker_hidden_size)


def load_codec(cfg: ModelConfig, folder: str | Path | None) -> Codec | None:
    """The talker's codec: Mimi from `talker.codec_pretrained`; the tiny codec from the model
    folder when a speech_out stage has fitted it there (None before that)."""
    section = cfg.talker
    if section.codec == "mimi":
        from omni.speech.mimi_codec import MimiCodec

        return check_codec(MimiCodec(section.codec_pretrained, section.codebooks), section)
    codec = fitted_codec(folder)
    return None if codec is None else check_codec(codec, section)


def fitted_codec(folder: str | Path | None) -> Codec | None:
    """The tiny codec saved in `folder` (`TinyCodec.save`), or None when it holds none."""
    if folder is None or not (Path(folder) / CONFIG_FILE).is_file():
        return None
    from omni.speech.tiny_codec import TinyCodec

    return TinyCodec.load(folder)


def fit_codec(section: TalkerSection, spoken: list[bytes], seed: int) -> Codec:
    """A tiny codec with the talker's codebook layout, fitted on these spoken answers (audio files)."""
    from omni.speech.tiny_codec import TinyCodec, TinyCodecConfig

    if section.codec != "tiny":
        raise ConfigError(f"talker.codec {section.codec} is pretrained; only the tiny codec is fitted on the corpus")
    config = TinyCodecConfig(codebooks=section.codebooks, codebook_size=section.codebook_size)
    return TinyCodec.fit([answer_wave(b, config.sample_rate) for b in spoken], config, seed=seed)


def answer_wave(data: bytes, sample_rate: int) -> np.ndarray:
    """A spoken answer's audio file (any format load_audio reads) as mono float32 at `sample_rate`."""
    wave = load_audio(data)
    if sample_rate == SAMPLE_RATE:
        return wave
    import librosa

    return librosa.resample(wave, orig_sr=SAMPLE_RATE, target_sr=sample_rate).astype(np.float32)


def check_codec(codec: Codec, section: TalkerSection) -> Codec:
    if (codec.codebooks, codec.codebook_size) != (section.codebooks, section.codebook_size):
        raise ConfigError(f"talker: the codec has {codec.codebooks} codebooks of {codec.codebook_size}, the talker "
                          f"predicts {section.codebooks} of {section.codebook_size}; set talker.codebooks and "
                          "talker.codebook_size to the codec's")
    return codec


def code_count(codes: list[torch.Tensor], codebook_size: int) -> int:
    """The codes the talker is scored on for these answers (its training loss's units): every
    delayed step but each codebook's leading PADs."""
    return sum(int((delay(c, codebook_size) != pad_id(codebook_size)).sum()) for c in codes)


def speech_loss(model, input_ids, attention_mask, labels, media, codes: list[torch.Tensor], position_ids=None,
                num_items_in_batch: float | None = None, blank: tuple[str, ...] = ()) -> torch.Tensor:
    """The talker's cross-entropy over every code of these spoken answers, summed and divided by
    `num_items_in_batch` (the step's codes), or its mean."""
    states = thinker_states(model, input_ids, attention_mask, labels, media, position_ids, blank)
    batch = talker_batch(states, codes, model.talker.config.codebook_size)
    if num_items_in_batch is None:
        return model.talker(batch)
    return model.talker(batch, reduction="sum") / num_items_in_batch


@torch.no_grad()
def teacher_forced_scores(model, states, codes: list[torch.Tensor]) -> tuple[float, int, int]:
    """(summed cross-entropy, right, scored) of one teacher-forced talker pass over these answers:
    right = codes whose argmax is the target, of every scored code."""
    logits, labels = model.talker.teacher_forced(talker_batch(states, codes, model.talker.config.codebook_size))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    scored = labels != IGNORE
    return float(loss), int((logits.argmax(-1)[scored] == labels[scored]).sum()), int(scored.sum())


@dataclasses.dataclass
class SpeechChunk:
    codes: torch.Tensor  # [K, n] the talker's frames new in this chunk
    wave: np.ndarray     # float32 at the codec's rate; the chunks concatenated are the answer's speech


@torch.no_grad()
def stream_speech(model, states, max_frames: int, first: int, every: int) -> Iterator[SpeechChunk]:
    """`speak`'s codes of one answer (its thinker `states`) as the talker produces them, with their
    audio: the first chunk after `first` frames, then every `every` frames, then the rest (omni/speech/stream.py)."""
    if len(states) != 1:
        raise ValueError(f"stream_speech: one answer at a time, got {len(states)}")
    dummy = [torch.zeros(model.talker.config.codebooks, 0, dtype=torch.long)]
    frames = model.talker.stream(talker_batch(states, dummy, model.talker.config.codebook_size), max_frames)
    decoder = ChunkDecoder(model.codec)
    pending: list[torch.Tensor] = []
    size = first
    for frame in frames:
        pending.append(frame.cpu())
        if len(pending) == size:
            codes, pending, size = torch.stack(pending, dim=1), [], every
            yield SpeechChunk(codes, decoder.push(codes))
    codes = torch.stack(pending, dim=1) if pending else torch.zeros(model.talker.config.codebooks, 0, dtype=torch.long)
    wave = decoder.push(codes) if pending else np.zeros(0, np.float32)
    yield SpeechChunk(codes, np.concatenate([wave, decoder.flush()]))


@torch.no_grad()
def answer_states(generator, prompts: list, media: list, answers: list[str]):
    """The thinker's (hidden, embeddings) at each answer's tokens, teacher-forced on prompt + that
    answer (a LocalGenerator's model, processor and placement)."""
    examples = []
    for prompt, m, answer in zip(prompts, media, answers, strict=True):
        ex = generator.processor([*prompt, {"role": "assistant", "content": answer}], m)
        ex.labels = last_span(ex.labels)  # the last reply only: earlier turns are context
        examples.append(ex)
    batch = collate_examples(examples, generator.tokenizer.pad_token_id).to(generator.device)
    return thinker_states(generator.model, batch.input_ids, batch.attention_mask, batch.labels,
                          generator._media(batch.media))


@torch.no_grad()
def speak_answer(generator, prompt: list[dict], media: dict, answer: str) -> np.ndarray:
    """`answer` to the conversation `prompt` spoken by the model's talker: a wave at its codec's rate."""
    model = generator.model
    if model.talker is None or model.codec is None:
        raise ConfigError("this model has no talker to speak with: train a speech_out stage on it first "
                          "(docs/speech_out.md)")
    codes = speak(model, answer_states(generator, [prompt], [media], [answer]), model.config.talker.max_frames)[0]
    return model.codec.decode(codes.cpu())

"""`lmms-eval --model omni --model_args pretrained=DIR`: an omni model folder (a stage's final/, a
consolidated checkpoint) or an `omni export` folder, answering lmms-eval's chat requests.

lmms-eval hands each item over as chat messages whose parts are text, images (PIL or a path),
videos (a path) and audio (a path, or an array with its sampling rate). `_infer_one` turns them into
omni's own form, the typed parts of docs/data_format.md (a media part becomes its placeholder, parts
joined by spaces), and answers through the one local generator that `omni eval` uses, so a task
built from omni's held-out samples scores what `omni eval` scores on them.
"""
from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
from lmms_eval.api.model import lmms
from lmms_eval.models.chat._chat_base import ChatMixin
from PIL import Image

from encoders import load_audio
from omni.data.loader import chat_turns
from omni.inference import load_media
from omni.model.generate import LocalGenerator


def _wav_bytes(array, rate: int) -> bytes:
    """A waveform (mono, or channels last) as 16-bit WAV bytes, for `load_audio` to resample to
    16 kHz as it does any file."""
    samples = np.asarray(array, dtype=np.float32)
    if samples.ndim > 1:
        samples = samples.mean(axis=-1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(int(rate))
        w.writeframes(np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes())
    return out.getvalue()


def _medium(kind: str, url):
    """(kind, content) of one media part, the content in the form omni's processor takes
    (omni/model/processor.py): an RGB PIL image, a video path, a 16 kHz float32 waveform. A waveform
    is audio whatever the part says (lmms-eval labels an audio column's dict 'video' when a task lists
    it among its visuals)."""
    if isinstance(url, Image.Image):
        return "image", url.convert("RGB")
    if hasattr(url, "get_all_samples"):
        samples = url.get_all_samples()
        return "audio", load_audio(_wav_bytes(samples.data.numpy().T, samples.sample_rate))
    if isinstance(url, dict) and "array" in url:
        return "audio", load_audio(_wav_bytes(url["array"], url["sampling_rate"]))
    if isinstance(url, dict):
        url = url.get("path") or url.get("url")
    if isinstance(url, (str, Path)):
        return kind, load_media(**{f"{kind}s": [str(url)]})[kind][0]
    raise TypeError(f"an lmms-eval {kind} part of type {type(url).__name__} is not something omni reads; "
                    "give a path, a PIL image or an audio dict with 'array' and 'sampling_rate'")


def omni_prompt(chat_messages) -> tuple[list[dict], dict[str, list]]:
    """lmms-eval ChatMessages -> (omni messages, media by kind in placeholder order)."""
    messages, media = [], {}
    for message in chat_messages.messages:
        parts = []
        for part in message.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            kind, content = _medium(part.type, part.url)
            parts.append({"type": kind})
            media.setdefault(kind, []).append(content)
        messages.append({"role": message.role, "content": parts})
    return chat_turns(messages, "lmms-eval request", "messages"), media


class OmniLmms(ChatMixin, lmms):
    """model_args: `pretrained` (folder), `device` (cpu, cuda, cuda:N), `dtype` (bf16, fp16, fp32),
    `max_new_tokens` (when the task's generation_kwargs do not say)."""

    is_simple = False

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = 64, batch_size: int | str = 1, **_unused) -> None:
        super().__init__()
        self.generator = LocalGenerator.load(pretrained, batch_size=1, device=device, dtype=dtype)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # ChatMixin's chunking

    def _infer_one(self, chat_messages, gen_kwargs: dict) -> str:
        messages, media = omni_prompt(chat_messages)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0) if gen_kwargs.get("do_sample", True) else 0.0
        example = self.generator.prompt(messages, media, max_new_tokens)
        answer = self.generator.generate([example], max_new_tokens, temperature)[0]
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            answer = answer.split(stop)[0]
        return answer.strip()

    def loglikelihood(self, requests):
        raise NotImplementedError("lmms-eval model omni answers generate_until tasks; this task scores "
                                  "log-likelihoods, which it does not compute")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("lmms-eval model omni answers single-round generate_until tasks; this task "
                                  "is multi-round")

"""Streaming generation: the answer arrives token by token while `generate` runs in a thread.

Used by `omni chat` (and the demo): the same processor, prompt template and greedy decoding as
`omni eval`, so a streamed answer equals the evaluated one for the same inputs.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from encoders import load_audio
from omni.modalities import MODALITIES, PLACEHOLDERS
from omni.model.processor import OmniProcessor, collate


def load_media(images=(), videos=(), audios=()) -> dict[str, list]:
    """Media files from disk in the form the processor takes (videos stay paths for decord)."""
    media: dict[str, list] = {}
    for path in images:
        media.setdefault("image", []).append(Image.open(path).convert("RGB"))
    for path in videos:
        media.setdefault("video", []).append(str(Path(path)))
    for path in audios:
        media.setdefault("audio", []).append(load_audio(str(path)))
    return media


def with_placeholders(text: str, counts: dict[str, int]) -> str:
    """Put the placeholders the user left out in front of `text`, as `omni chat` does:
    image, video, audio in that order, each followed by a space."""
    missing = "".join(f"{PLACEHOLDERS[m]} " * (counts.get(m, 0) - text.count(PLACEHOLDERS[m]))
                      for m in MODALITIES)
    return missing + text


def stream_answer(model, tokenizer, processor: OmniProcessor, messages: list[dict],
                  media: dict[str, list] | None = None, max_new_tokens: int = 64) -> Iterator[str]:
    """Yield text pieces of the greedy answer to `messages` (ending with a user turn)."""
    example = processor(messages, media, add_generation_prompt=True)
    batch = collate([example], tokenizer.pad_token_id, left_pad=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                model.generate(batch.input_ids, batch.attention_mask, batch.media, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]

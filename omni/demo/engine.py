"""The model side of the demo: load once, encode webcam frames and speech and prefill the LLM ahead,
stream answers with timings.

Generation is the one `LocalGenerator` (omni/model/generate.py: the processor, prompt and greedy
decoding with the KV cache of `omni chat` and `omni eval`); nothing here decodes tokens.

Frames encoded while audio arrives (Baichuan-Omni's real-time design): the image tower is wrapped
in `FrameFeatureCache`, a content-addressed cache of its per-frame outputs. Each webcam frame that
enters the rolling window is preprocessed and run through the tower as it arrives
(`encode_ahead`); when the turn is sent, the model's own `encode("video")` calls the tower on the
window's pixels and gets those rows from the cache, so only the video projector (a 2x2 pool and
an MLP), the audio tower and the LLM prefill run after the user stops speaking. The model's
fusion code runs unchanged; a row not in the cache (uploaded images, a frame evicted early) is
computed then, as without the cache.

Speech is encoded the same way where the audio tower's windows allow: each whisper window
(`audio.n_ctx` x 20 ms of audio; 1 s on the tiny model, 30 s on the 7B) is log-mel'd and run
through the audio tower as soon as the recording has filled it (`encode_audio_ahead`), through a
second `FrameFeatureCache` around the audio tower keyed by the window's log-mel.

The LLM is prefilled the same way (`prefill_ahead`): the turn so far (the chat, the camera window,
the whole audio windows) goes through the LLM into the session's `PromptCache`
(omni/model/prompt_cache.py) up to its last media token, and the turn reuses the longest prefix
of its prompt that matches. `MemoProcessor` keeps the processor's per-frame preprocessing and
per-window log-mel, so the turn's processor call does not redo them. After the user stops, what
runs is the processor's template, the projectors, the LLM over the positions not prefilled (the
last, partial audio window unless the VAD's pause already took it, the typed text, the closing
template tokens) and decoding.

A model with a talker (docs/speech_out.md) also speaks its answers (`speak`): once the text answer
is complete, the thinker runs teacher-forced on prompt + answer (the talker reads every answer
token's state, as it was trained to) and the talker's frames are decoded and handed on a chunk at
a time (`omni.model.speech.stream_speech`): the first after `FIRST_CHUNK_S` of speech, then every
`CHUNK_S`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from omni.demo.session import Conversation, MediaItem
from omni.errors import SampleError
from omni.model.generate import ContextError, LocalGenerator
from omni.model.processor import OmniProcessor
from omni.model.prompt_cache import PromptCache
from omni.model.speech import answer_states, stream_speech

log = logging.getLogger("omni.demo")
FIRST_CHUNK_S = 0.16  # speech in the first audio chunk (the tiny codec: 10 frames, 112 ms of them played at once)
CHUNK_S = 0.48        # speech in each later chunk (fewer codec calls; still far ahead of playback)


class FrameFeatureCache(nn.Module):
    """The image tower with a cache of its outputs, keyed by each frame's pixel content.

    `forward(pixels)` returns exactly `tower(pixels)` row for row: cached rows come from the
    cache, the rest from one tower call. `encode_ahead(pixels)` computes and stores rows.
    Other attributes (`num_patches`, `preprocess`, ...) are the tower's.
    """

    def __init__(self, tower: nn.Module, capacity: int):
        super().__init__()
        self.tower = tower
        self.capacity = capacity
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["tower"], name)

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        raw = row.detach().cpu().contiguous().flatten().view(torch.uint8)  # bytes of any dtype (numpy has no bf16)
        return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).digest()

    @torch.no_grad()
    def encode_ahead(self, pixels: torch.Tensor) -> int:
        """Run the tower on rows not cached yet and keep the results; returns how many ran."""
        keys = [self._key(r) for r in pixels]
        with self._lock:
            todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            feats = self.tower(pixels[todo])
            with self._lock:
                for i, f in zip(todo, feats):
                    self._cache[keys[i]] = f.clone()
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return len(todo)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        keys = [self._key(r) for r in pixels]
        with self._lock:
            found = {i: self._cache[k] for i, k in enumerate(keys) if k in self._cache}
            for i in found:
                self._cache.move_to_end(keys[i])
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        if not found:
            return self.tower(pixels)
        todo = [i for i in range(len(keys)) if i not in found]
        if todo:
            found.update(zip(todo, self.tower(pixels[todo])))
        return torch.stack([found[i] for i in range(len(keys))])


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


class MemoProcessor(OmniProcessor):
    """The model's processor, remembering by content the preprocessing of each picture (camera
    frame, image tile) and log-mel of each audio window it computed: the frames and whole windows
    prepared while the user speaks are not prepared again when the turn is sent. Same outputs as
    `OmniProcessor` (each picture and window is preprocessed on its own there too)."""

    def __init__(self, processor: OmniProcessor, pictures: int, windows: int):
        super().__init__(processor.tokenizer, **processor.configs())
        self._memo: dict[str, OrderedDict[bytes, torch.Tensor]] = {"picture": OrderedDict(), "window": OrderedDict()}
        self._capacity = {"picture": pictures, "window": windows}
        self._lock = threading.Lock()

    def _get(self, kind: str, key: bytes, compute) -> torch.Tensor:
        memo = self._memo[kind]
        with self._lock:
            if key in memo:
                memo.move_to_end(key)
                return memo[key]
        value = compute()
        with self._lock:
            memo[key] = value
            while len(memo) > self._capacity[kind]:
                memo.popitem(last=False)
        return value

    def pixels(self, images: list) -> torch.Tensor:
        rows = []
        for im in images:
            im = im.convert("RGB")
            key = _digest(repr(im.size).encode(), im.tobytes())
            rows.append(self._get("picture", key, lambda im=im: super(MemoProcessor, self).pixels([im])[0]))
        return torch.stack(rows)

    def log_mel(self, window) -> torch.Tensor:
        samples = np.ascontiguousarray(window, dtype=np.float32)
        return self._get("window", _digest(samples.tobytes()), lambda: super(MemoProcessor, self).log_mel(samples))


@dataclass
class TurnStats:
    ttft_s: float = float("nan")       # input complete -> first generated token (prefill done)
    tokens: int = 0                    # generated tokens (LLM forward calls during generate)
    decode_s: float = 0.0              # first -> last generated token
    total_s: float = 0.0               # input complete -> answer done
    prompt_tokens: int = 0
    prefilled: int = 0                 # prompt positions the LLM ran after the turn was sent (the rest: cache)
    frames_ahead: int = 0              # video frames whose tower features were ready in advance
    frames: int = 0                    # video frames in the prompt
    dropped: int = 0                   # oldest turns forgotten to fit the model's context
    first_audio_s: float = float("nan")  # input complete -> first chunk of the spoken answer decoded
    audio_s: float = 0.0               # seconds of spoken answer
    audio_chunks: int = 0

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else float("nan")

    def line(self) -> str:
        tps = self.tokens_per_s
        ahead = self.prompt_tokens - self.prefilled if 0 < self.prefilled < self.prompt_tokens else 0
        parts = [f"TTFT {self.ttft_s * 1000:.0f} ms",
                 f"{self.tokens} tokens" + (f" at {tps:.1f} tokens/s" if math.isfinite(tps) else ""),
                 f"prompt {self.prompt_tokens} tokens" + (f" ({ahead} prefilled ahead)" if ahead else "")]
        if self.frames:
            parts.append(f"{self.frames_ahead}/{self.frames} frames encoded ahead")
        if self.audio_chunks:
            parts.append(f"first audio {self.first_audio_s * 1000:.0f} ms ({self.audio_s:.2f} s of speech in "
                         f"{self.audio_chunks} chunks)")
        return " · ".join(parts)


class DemoEngine:
    """One model shared by every browser session; generation runs one turn at a time."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 64,
                 cache_frames: int | None = None, pas: str | None = None, pas_endpoint_model: str = "default",
                 device: str | None = None, dtype: str | None = None):
        t0 = time.perf_counter()
        self.model_dir = Path(model_dir)
        self.augmenter = None  # PAS in front of the model (`--pas`): a model folder or an endpoint
        if pas:
            from omni.align.pas import PromptAugmenter

            self.augmenter = PromptAugmenter.load(pas, pas_endpoint_model)
        # a final/, a checkpoint or an export, on `device` in `dtype` (omni.model.generate.resolve_placement)
        self.generator = LocalGenerator.load(model_dir, batch_size=1, device=device, dtype=dtype)
        self.model, self.tokenizer = self.generator.model, self.generator.tokenizer
        self.speaks = self.model.talker is not None and self.model.codec is not None
        if self.speaks:  # codec frames in the first audio chunk, and in each later one
            rate = self.model.codec.frame_rate
            self.speech_chunks = (max(4, round(FIRST_CHUNK_S * rate)), max(4, round(CHUNK_S * rate)))
        self.video = self.model.config.video
        max_windows = self.model.config.audio.max_windows
        self.processor = self.generator.processor = MemoProcessor(
            self.generator.processor, cache_frames or 4 * self.video.max_frames, 2 * max_windows)
        self.max_new_tokens = max_new_tokens
        self.policy = self.processor.policy  # long audio / video and silence: the processor's, as in omni chat
        self.frame_cache = FrameFeatureCache(self.model.encoders["image"],
                                             cache_frames or 4 * self.video.max_frames)
        self.model.encoders["image"] = self.frame_cache
        self.audio_cache = FrameFeatureCache(self.model.encoders["audio"], 2 * max_windows)
        self.model.encoders["audio"] = self.audio_cache
        self._lock = threading.Lock()
        self._steps: list[float] = []      # one time stamp per LLM forward = per generated token
        self._prompt_len = 0
        self.model.llm.register_forward_hook(self._count_step, with_kwargs=True)
        log.info("loaded %s in %.1f s (%s)", self.model_dir, time.perf_counter() - t0, self.policy.describe())

    def _count_step(self, module, args, kwargs, output) -> None:
        if not self._steps and kwargs.get("inputs_embeds") is not None:
            self._prompt_len = kwargs["inputs_embeds"].shape[1]
        self._steps.append(time.perf_counter())

    def describe(self) -> str:
        cfg = self.model.config
        n = sum(p.numel() for p in self.model.parameters())
        return f"`{self.model_dir}` — preset {cfg.name}, {n / 1e6:.1f}M parameters; {self.policy.describe()}"

    def augment(self, text: str) -> tuple[str, str]:
        """(what the model reads, the PAS complement shown to the user); unchanged without PAS."""
        if self.augmenter is None or not text.strip():
            return text, ""
        with self._lock:  # a local PAS model generates on the same cores as the answer
            augmented = self.augmenter.augment(text)
        return augmented, augmented[len(text):].strip()

    @torch.no_grad()
    def encode_ahead(self, frame: Image.Image) -> float:
        """Preprocess one webcam frame and run it through the image tower now; returns seconds."""
        t0 = time.perf_counter()
        pixels = self.processor.pixels([frame.convert("RGB")]).to(self.generator.device, self.generator.dtype)
        self.frame_cache.encode_ahead(pixels)
        return time.perf_counter() - t0

    @torch.no_grad()
    def encode_audio_ahead(self, waveform, partial: bool = False) -> float:
        """Run the audio tower now on every whole window of a recording still in progress (16 kHz
        mono, the waveform the model will read, from its start), and on its last, partial window
        too when `partial` (the recording is the utterance as it will be sent); returns seconds.
        The processor cuts each window and computes its log-mel the same way, so the turn finds these rows."""
        t0 = time.perf_counter()
        tower = self.audio_cache.tower
        windows = [w for w in tower.split_windows(waveform) if partial or len(w) == tower.window_samples]
        windows = windows[:self.model.config.audio.max_windows]
        if windows:
            # in the dtype the composition hands the tower (omni/model/composition.py)
            mels = torch.stack([self.processor.log_mel(w) for w in windows]).to(self.generator.device,
                                                                                 tower.encoder.conv1.weight.dtype)
            self.audio_cache.encode_ahead(mels)
        return time.perf_counter() - t0

    @torch.no_grad()
    def prefill_ahead(self, cache: PromptCache, chat: Conversation, frames: list, waveform=None,
                      partial: bool = False) -> float:
        """While the user speaks: run now what the coming turn's prompt already holds, into `cache`
        (the session's; omni/model/prompt_cache.py). The turn so far is `chat`'s turns, then a user
        turn with the camera `frames` and the recording so far (16 kHz `waveform`, cut to its whole
        audio windows unless `partial`: the utterance as it will be sent) and no text yet: frames
        and windows go through their towers (`encode_ahead`, `encode_audio_ahead`) and the LLM
        prefills the prompt up to its last media
        token (the typed text and the template's closing tokens come when the turn is sent). Skipped
        while a turn is being answered, and when the media policy refuses the audio so far (e.g.
        silence). Returns seconds spent."""
        t0 = time.perf_counter()
        if not self._lock.acquire(blocking=False):  # answering comes first; the turn then does the rest itself
            return 0.0
        try:
            items = []
            for frame in frames:
                self.encode_ahead(frame)
            if frames:
                items.append(MediaItem("video", list(frames), "camera"))
            if waveform is not None:
                window = self.audio_cache.tower.window_samples
                keep = len(waveform) if partial else len(waveform) // window * window
                if keep:
                    self.encode_audio_ahead(waveform[:keep], partial)
                    items.append(MediaItem("audio", np.asarray(waveform[:keep], np.float32), "microphone"))
            turn = Conversation()
            turn.turns = list(chat.turns)
            turn.add_user("", items)
            try:
                example = self.generator.prompt(turn.messages(), turn.media())
            except SampleError:
                return time.perf_counter() - t0
            ids = example.input_ids[None].to(self.generator.device)
            media_at = torch.isin(ids[0], torch.tensor(list(self.model.token_ids.values()), device=ids.device))
            if bool(media_at.any()):
                embeds = self.model.embed(ids, self.generator._media(example.media))
                cache.prefill(self.model.llm, ids, embeds, int(media_at.nonzero().max()) + 1)
        finally:
            self._lock.release()
        return time.perf_counter() - t0

    def stream(self, messages: list[dict], media: dict[str, list], stats: TurnStats, t_input: float,
               max_new_tokens: int | None = None, prompt_cache: PromptCache | None = None):
        """Yield answer pieces from the generator; fill `stats` (timings from `t_input`).
        `prompt_cache`: the session's (see `prefill_ahead`). Raises omni.errors.SampleError before
        the first piece when the prompt does not fit."""
        with self._lock:
            self._steps.clear()
            self._prompt_len = 0
            hits0 = self.frame_cache.hits
            stats.frames = sum(len(v) for v in media.get("video", []))
            max_new_tokens = max_new_tokens or self.max_new_tokens
            example = self.generator.prompt(messages, media, max_new_tokens)
            stats.prompt_tokens = len(example.input_ids)
            pieces = self.generator.stream(example, max_new_tokens, prompt_cache=prompt_cache)
            try:  # closed here, under the lock, when the reader stops early: decoding stops with it
                for piece in pieces:
                    if self._steps and math.isnan(stats.ttft_s):
                        stats.ttft_s = self._steps[0] - t_input
                    yield piece
            finally:
                pieces.close()
            if self._steps:
                stats.ttft_s = self._steps[0] - t_input
            stats.total_s = time.perf_counter() - t_input
            stats.tokens = len(self._steps)
            stats.decode_s = self._steps[-1] - self._steps[0] if len(self._steps) > 1 else 0.0
            stats.frames_ahead = min(stats.frames, self.frame_cache.hits - hits0)
            stats.prefilled = self._prompt_len

    def speak(self, messages: list[dict], media: dict[str, list], answer: str, stats: TurnStats,
              t_input: float):
        """Yield the model's spoken `answer` to the conversation `messages` (ending with the user's
        turn) as `SpeechChunk`s; fill `stats`' audio fields (timed from `t_input`). A model without
        a talker (`speaks` False) yields nothing."""
        if not self.speaks or not answer.strip():
            return
        with self._lock:
            states = answer_states(self.generator, [messages], [media], [answer.strip()])
            chunks = stream_speech(self.model, states, self.model.config.talker.max_frames, *self.speech_chunks)
            try:  # closed here, under the lock, when the reader stops early: the talker stops with it
                for chunk in chunks:
                    if not stats.audio_chunks:
                        stats.first_audio_s = time.perf_counter() - t_input
                    stats.audio_chunks += 1
                    stats.audio_s += chunk.wave.size / self.model.codec.sample_rate
                    yield chunk
            finally:
                chunks.close()

    def answer(self, chat, stats: TurnStats, t_input: float, max_new_tokens: int | None = None,
               prompt_cache: PromptCache | None = None):
        """Stream the answer to the last turn of `chat` (an omni.demo.session.Conversation), with the
        session's `prompt_cache` when it has one (see `prefill_ahead`).

        While the prompt is longer than the model's context, the oldest turns are dropped
        (counted in `stats.dropped`); a last turn that does not fit alone raises SampleError, as
        does any other input the processor refuses."""
        while True:
            pieces = self.stream(chat.messages(), chat.media(), stats, t_input, max_new_tokens, prompt_cache)
            try:
                first = next(pieces)
            except StopIteration:
                return
            except SampleError as e:  # raised by the processor before generation starts
                too_long = isinstance(e, ContextError) or "exceeds max_length" in str(e)
                if too_long and chat.drop_oldest():
                    stats.dropped += 1
                    continue
                raise
            try:
                yield first
                yield from pieces
            finally:
                pieces.close()
            return

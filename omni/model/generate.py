"""The one local generator: `omni chat`, `omni eval`, `omni demo` and every align stage that needs a
model to write (benchmark answers, judge verdicts, PAS complements) decode through `LocalGenerator`.

- Prompts: `prompt()` turns messages + media into an `Example` with the omni processor (placeholders
  expanded to their media tokens) and refuses one that leaves no room for the answer in the
  model's context; `chat()` takes plain-text conversations (align) and keeps their last tokens.
- Decoding: `model.generate` of transformers, greedy or sampled, in left-padded batches; the LLM
  keeps its KV cache (`past_key_values`) across steps, so the prompt is run once and each new
  token costs one position (tests/unit/test_generator.py counts the positions every step feeds).
- Streaming: `stream()` yields text pieces while `generate` runs in a thread; closing it stops
  decoding. With a `PromptCache` (omni/model/prompt_cache.py: the demo prefills a turn while the
  user speaks) the LLM runs only the prompt positions the cache does not hold.
- Placement: `load(path, device, dtype)`; `resolve_placement` gives the default, CUDA + bf16 where a
  GPU is visible, else CPU + fp32. Media tensors follow the model's device and dtype.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from omni.config import ConfigError
from omni.errors import SampleError
from omni.model.batch import MediaBatch
from omni.model.fusion import IGNORE
from omni.model.processor import Example, OmniProcessor, collate
from omni.model.prompt_cache import PromptCache

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ContextError(SampleError):
    """A prompt plus the tokens to generate do not fit the model's context."""


def resolve_placement(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) from `--device` / `--dtype`: by default CUDA + bf16 where a GPU is visible
    (fp16 on a GPU without bf16), else CPU + fp32. bf16 on CPU is allowed (slow, half the memory)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {sorted(DTYPES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        place = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if place.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    if dtype is None:
        if place.type != "cuda":
            return place, torch.float32
        return place, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return place, DTYPES[dtype]


def place_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move and cast `model` in place. Norms that compute in fp32 (whisper's and open_clip's cast their
    input up) keep fp32 weights: PyTorch's CPU layer_norm refuses fp32 input with 16-bit weights."""
    model.to(device=device, dtype=dtype)
    for module in model.modules():
        if computes_in_fp32(module):
            module.float()


def hold_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen (requires_grad False) floating parameters of `model` to `dtype` in place, but
    those of norms that compute in fp32 (as `place_model`); the trainable ones keep theirs (fp32
    master weights). Returns the number of elements cast. A stage that trains in bf16 computes
    its frozen parts in bf16 under autocast anyway; holding them in bf16 halves their memory."""
    cast = 0
    for module in model.modules():
        if computes_in_fp32(module):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += p.numel()
    return cast


def computes_in_fp32(module: torch.nn.Module) -> bool:
    """Norms that cast their input up to fp32 (whisper's, open_clip's LayerNormFp32): their weights stay fp32."""
    from open_clip.transformer import LayerNormFp32
    from whisper.model import LayerNorm as WhisperLayerNorm

    return isinstance(module, (WhisperLayerNorm, LayerNormFp32))


class LocalGenerator:
    """Decode with a local model: an OmniModel (with its processor) or any transformers causal LM."""

    def __init__(self, model, tokenizer, batch_size: int = 8, omni: bool = True):
        self.model, self.tokenizer, self.batch_size, self.omni = model, tokenizer, batch_size, omni
        self.model.eval()
        cfg = model.llm.config if omni else model.config
        self.context = getattr(cfg, "max_position_embeddings", 4096)
        self.processor = OmniProcessor.from_config(model.config, tokenizer, model.token_ids) if omni else None
        self.eos = [tokenizer.eos_token_id]
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in self.eos:
            self.eos.append(im_end)

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 8, device: str | None = None,
             dtype: str | None = None) -> LocalGenerator:
        """An omni model folder (any `load_model` reads) or a transformers model folder/name."""
        from omni.model.load import is_exported_dir, load_model, sharded_checkpoint
        from omni.model.omni_model import CONFIG

        place, torch_dtype = resolve_placement(device, dtype)
        if (Path(path) / CONFIG).is_file() or is_exported_dir(path) or sharded_checkpoint(path):  # the last: refused
            model, tok = load_model(path)
            omni = True
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from omni.tokenizer import CHAT_TEMPLATE

            tok = AutoTokenizer.from_pretrained(path)
            if tok.chat_template is None:
                tok.chat_template = CHAT_TEMPLATE
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
            omni = False
        place_model(model, place, torch_dtype)
        if omni:  # the attention backend for forwards in this dtype on this device (FlashAttention-2: 16 bits, GPU)
            log.info("%s on %s in %s: %s attention", path, place, torch_dtype, model.use_attention(torch_dtype, place))
        return cls(model, tok, batch_size, omni=omni)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- prompts -------------------------------------------------------------------------------
    def prompt(self, messages: list[dict], media: dict[str, list] | None = None, max_new_tokens: int = 0,
               blank: bool = False) -> Example:
        """The processor's generation prompt for `messages` (ending with a user turn); SampleError when
        the processor refuses it, ContextError when `max_new_tokens` more would pass the context."""
        example = self.processor(messages, media, add_generation_prompt=True, blank=blank)
        n = len(example.input_ids)
        if n + max_new_tokens > self.context:
            raise ContextError(f"prompt of {n} tokens + {max_new_tokens} new tokens exceed the model's context "
                               f"of {self.context} tokens")
        return example

    def _text_prompt(self, messages: list[dict], max_new_tokens: int) -> Example:
        """A text-only prompt by the chat template, cut to its last tokens to leave room for the answer."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        room = max(1, self.context - max_new_tokens)
        if len(ids) > room:
            log.warning("prompt of %d tokens cut to its last %d (context %d, %d new tokens)",
                        len(ids), room, self.context, max_new_tokens)
            ids = ids[-room:]
        ids = torch.tensor(list(ids), dtype=torch.long)
        return Example(ids, torch.full_like(ids, IGNORE), MediaBatch())

    # ---- decoding ------------------------------------------------------------------------------
    def _kwargs(self, max_new_tokens: int, temperature: float) -> dict:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        return {"max_new_tokens": max_new_tokens, "eos_token_id": self.eos,
                "pad_token_id": self.tokenizer.pad_token_id, **sample}

    def _media(self, media: MediaBatch) -> MediaBatch:
        """Media on the model's device; pixels in its dtype (log-mels are cast by the audio tower)."""
        media = media.to(self.device)
        for name in ("image", "video"):
            if getattr(media, name) is not None:
                setattr(media, name, getattr(media, name).to(self.dtype))
        return media

    @torch.no_grad()
    def _generate(self, examples: list[Example], kwargs: dict) -> torch.Tensor:
        """New token ids [B, <= max_new_tokens] of one left-padded batch."""
        batch = collate(examples, self.tokenizer.pad_token_id, left_pad=True)
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        if self.omni:
            return self.model.generate(ids, mask, self._media(batch.media), **kwargs)
        return self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]

    def generate(self, examples: list[Example], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        """The decoded answer (special tokens dropped) of each example, `batch_size` at a time."""
        kwargs = self._kwargs(max_new_tokens, temperature)
        out: list[str] = []
        for start in range(0, len(examples), self.batch_size):
            new = self._generate(examples[start:start + self.batch_size], kwargs)
            out += [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return out

    def stream(self, example: Example, max_new_tokens: int, temperature: float = 0.0,
               prompt_cache: PromptCache | None = None) -> Iterator[str]:
        """Text pieces of the answer to one example as they are decoded; an error in the decoding
        thread is raised here. Closing the iterator early (the reader went away) stops decoding at
        the next token. `prompt_cache` (omni models): see OmniModel.generate; emptied when decoding
        was stopped early or failed."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        # an omni prompt goes in as embeddings: generate's output (what the streamer sees) is new tokens only
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=not self.omni, skip_special_tokens=True)
        stop = threading.Event()

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs = {**self._kwargs(max_new_tokens, temperature), "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([Stopped()])}
        if prompt_cache is not None and self.omni:
            kwargs["prompt_cache"] = prompt_cache
        errors: list[BaseException] = []

        def run():
            try:
                self._generate([example], kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        finished = False
        try:
            yield from streamer
            finished = True
        finally:
            stop.set()  # a no-op when decoding has ended; else it ends at the next token
            thread.join()
            if prompt_cache is not None and not finished:  # a cut-short answer is not kept
                prompt_cache.clear()
        if errors:
            raise errors[0]

    def chat(self, conversations: list[list[dict]], max_new_tokens: int = 256,
             temperature: float = 0.0) -> list[str]:
        """One reply per text conversation (align's Generator protocol), stripped."""
        examples = [self._text_prompt(m, max_new_tokens) for m in conversations]
        return [r.strip() for r in self.generate(examples, max_new_tokens, temperature)]

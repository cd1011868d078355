"""Text generators behind one call, `chat(conversations) -> replies`, used by every align stage
that needs an LLM to write something: benchmark answers, judge verdicts, PAS complements.

- `LocalGenerator`: an omni model folder (a stage's `final/`) or any transformers causal LM
  folder/name, greedy or sampled decoding in left-padded batches.
- `OpenAIGenerator`: any OpenAI-compatible `/chat/completions` endpoint (vLLM, TGI, llama.cpp
  server, hosted APIs), through the standard library's urllib; requests run in a small thread
  pool; 429/5xx and connection errors are retried with backoff, other HTTP errors fail at once.
`make_generator(spec)` picks one: an `http(s)://` URL is an endpoint, anything else a model path.
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A generator could not produce a reply (endpoint refused, malformed response)."""


class Generator(Protocol):
    def chat(self, conversations: list[list[dict]], max_new_tokens: int = 256,
             temperature: float = 0.0) -> list[str]:
        """One reply per conversation (each a list of {role, content} ending with a user turn)."""
        ...


class LocalGenerator:
    """Decode with a local model. Prompts longer than the model's context keep their last tokens."""

    def __init__(self, model, tokenizer, batch_size: int = 8, omni: bool = True):
        self.model, self.tokenizer, self.batch_size, self.omni = model, tokenizer, batch_size, omni
        self.model.eval()
        cfg = model.llm.config if omni else model.config
        self.context = getattr(cfg, "max_position_embeddings", 4096)

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 8, device: str | None = None) -> LocalGenerator:
        """An omni model folder (has omni_config.json) or a transformers model folder/name."""
        from omni.model.load import load_model
        from omni.model.omni_model import CONFIG

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if (Path(path) / CONFIG).is_file():
            model, tok = load_model(path)
            return cls(model.to(device), tok, batch_size, omni=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from omni.tokenizer import CHAT_TEMPLATE

        tok = AutoTokenizer.from_pretrained(path)
        if tok.chat_template is None:
            tok.chat_template = CHAT_TEMPLATE
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        return cls(model.to(device), tok, batch_size, omni=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        room = max(1, self.context - max_new_tokens)
        if len(ids) > room:
            log.warning("prompt of %d tokens cut to its last %d (context %d, %d new tokens)",
                        len(ids), room, self.context, max_new_tokens)
            ids = ids[-room:]
        return list(ids)

    @torch.no_grad()
    def chat(self, conversations: list[list[dict]], max_new_tokens: int = 256,
             temperature: float = 0.0) -> list[str]:
        tok = self.tokenizer
        eos = [tok.eos_token_id]
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id and im_end not in eos:
            eos.append(im_end)
        sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            encoded = [self._encode(m, max_new_tokens) for m in conversations[start:start + self.batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(encoded):
                ids[i, width - len(e):] = torch.tensor(e)
                mask[i, width - len(e):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": tok.pad_token_id, **sample}
            if self.omni:
                new = self.model.generate(ids, mask, None, **kwargs)
            else:
                new = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
            out += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
        return out


class OpenAIGenerator:
    """POST {base_url}/chat/completions; the key (if any) comes from the env var `api_key_env`."""

    def __init__(self, base_url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, retries: int = 4, backoff: float = 1.0, workers: int = 4):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {base_url!r}: expected an http(s):// URL such as http://127.0.0.1:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff, self.workers = timeout, retries, backoff, workers

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps(payload).encode("utf-8")
        delay = self.backoff
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if e.code != 429 and e.code < 500:
                    raise GenerationError(f"{self.url}: HTTP {e.code}: {detail}") from None
                err = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                err = str(e)
            if attempt < self.retries:
                log.warning("%s: %s; retry %d/%d in %.1f s", self.url, err, attempt + 1, self.retries, delay)
                time.sleep(delay)
                delay *= 2
        raise GenerationError(f"{self.url}: no answer after {self.retries + 1} attempts ({err})")

    def _one(self, messages: list[dict], max_new_tokens: int, temperature: float) -> str:
        data = self._post({"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": temperature})
        try:
            return (data["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            raise GenerationError(f"{self.url}: unexpected response {str(data)[:300]}") from None

    def chat(self, conversations: list[list[dict]], max_new_tokens: int = 256,
             temperature: float = 0.0) -> list[str]:
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return list(pool.map(lambda m: self._one(m, max_new_tokens, temperature), conversations))


def make_generator(spec: str, endpoint_model: str = "default", batch_size: int = 8, **http) -> Generator:
    """`http(s)://HOST/v1` -> OpenAIGenerator (model name `endpoint_model`); else a model path."""
    if spec.startswith(("http://", "https://")):
        return OpenAIGenerator(spec, model=endpoint_model, **http)
    return LocalGenerator.load(spec, batch_size=batch_size)

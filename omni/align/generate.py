"""Text generators behind one call, `chat(conversations) -> replies`, used by every align stage
that needs an LLM to write something: benchmark answers, judge verdicts, PAS complements.

- `LocalGenerator` (omni/model/generate.py, the one generator `omni chat` and `omni eval` use too):
  an omni model folder (a stage's `final/`) or any transformers causal LM folder/name, greedy or
  sampled decoding in left-padded batches with the KV cache.
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
from typing import Protocol

from omni.model.generate import LocalGenerator

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A generator could not produce a reply (endpoint refused, malformed response)."""


class Generator(Protocol):
    def chat(self, conversations: list[list[dict]], max_new_tokens: int = 256,
             temperature: float = 0.0) -> list[str]:
        """One reply per conversation (each a list of {role, content} ending with a user turn)."""
        ...


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

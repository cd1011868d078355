"""The LLM's KV cache of a prompt that grows, so what is known early is prefilled early.

A live turn knows most of its prompt before it is sent: the conversation so far, then the camera
frames and each whole window of speech as they arrive. `PromptCache` holds the LLM's KV cache (a
transformers `DynamicCache`) of a prompt's first positions together with the token ids and input
embeddings they were computed from. Each use starts with the longest prefix of the new prompt
that matches what is held (same ids; embeddings equal within torch.testing's default tolerance
for their dtype: the same frame or window projected in a batch of another size differs by
rounding), crops the cache there and runs the LLM over the rest only. Any difference (a frame
that dropped out of the camera window, other history, other media) just shortens the match, so
what the model reads is always the new prompt.

One prompt at a time (batch 1, no padding). A forward or a generation that fails or is stopped
leaves the cache empty rather than half-updated.
"""
from __future__ import annotations

import torch

# torch.testing.assert_close's defaults (rtol, atol) by dtype
_TOLERANCE = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}


class PromptCache:
    """KV cache + the ids and embeddings of the prompt positions it holds."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.kv = None
        self.ids: torch.Tensor | None = None      # [1, n]
        self.embeds: torch.Tensor | None = None   # [1, n, D]

    def __len__(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    def matching(self, ids: torch.Tensor, embeds: torch.Tensor) -> int:
        """How many first positions of (ids, embeds) the cache holds."""
        n = min(len(self), ids.shape[1])
        if n == 0:
            return 0
        rtol, atol = _TOLERANCE.get(embeds.dtype, _TOLERANCE[torch.float32])
        same = (self.ids[0, :n] == ids[0, :n]) & torch.isclose(self.embeds[0, :n], embeds[0, :n],
                                                               rtol=rtol, atol=atol).all(-1)
        return n if bool(same.all()) else int((~same).int().argmax())

    def _reuse(self, llm, ids: torch.Tensor, embeds: torch.Tensor, limit: int) -> int:
        """Crop to the matching prefix (at most `limit` positions); returns its length."""
        from transformers import DynamicCache

        if ids.shape[0] != 1:
            raise ValueError(f"PromptCache: one prompt at a time, got a batch of {ids.shape[0]}")
        n = min(self.matching(ids, embeds), limit)
        if self.kv is None:
            self.kv = DynamicCache(config=llm.config)
        if self.kv.get_seq_length() > n:
            self.kv.crop(n - self.kv.get_seq_length())
        self.ids, self.embeds = ids[:, :n], embeds[:, :n]
        return n

    @torch.no_grad()
    def prefill(self, llm, ids: torch.Tensor, embeds: torch.Tensor, upto: int | None = None) -> int:
        """Make the cache hold the first `upto` (default: all) positions of the prompt, running the
        LLM's decoder (no head: nothing is sampled) over those it does not hold yet; returns how many ran."""
        upto = ids.shape[1] if upto is None else upto
        try:
            n = self._reuse(llm, ids, embeds, upto)
            if upto > n:
                llm.get_decoder()(inputs_embeds=embeds[:, n:upto], cache=self.kv, use_cache=True)
        except BaseException:
            self.clear()
            raise
        self.ids, self.embeds = ids[:, :upto], embeds[:, :upto]
        return upto - n

    def for_generation(self, llm, ids: torch.Tensor, embeds: torch.Tensor):
        """The cache to hand `generate` for this prompt: its matching prefix, at most all but the
        last position (generate runs the rest, and the last gives the first token's logits)."""
        self._reuse(llm, ids, embeds, ids.shape[1] - 1)
        return self.kv

    def generated(self, ids: torch.Tensor, embeds: torch.Tensor, completed: bool) -> None:
        """After `generate` (which appended the prompt's rest and the answer to the cache): keep the
        prompt's positions (the next turn starts with them) when it completed, else drop it all."""
        if not completed or self.kv is None:
            self.clear()
            return
        extra = self.kv.get_seq_length() - ids.shape[1]
        if extra > 0:
            self.kv.crop(-extra)
        self.ids, self.embeds = ids, embeds

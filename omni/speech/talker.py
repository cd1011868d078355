"""The talker: a small causal transformer (transformers' Qwen2Model, the thinker's own family) that
reads the thinker and speaks codec frames.

One sequence per answer: the conditioning (per answer token, the projected thinker hidden state plus
the projected embedding of that token), a speech-start token, then the delayed codec steps
(omni/speech/delay.py), each step's input being the sum of its K codebooks' embeddings. The decoder's
output at a position predicts the next step's K codes through one linear head. Conditioning is
left-padded, so speech starts at the same position in every row of a batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, Qwen2Config, Qwen2Model

from omni.speech.delay import delay, eos_id, pad_id, undelay

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 4096
    codebooks: int = 4
    codebook_size: int = 64

    def __post_init__(self):
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"TalkerConfig: hidden_size ({self.hidden_size}) must divide by heads ({self.heads}) "
                             f"and heads by kv_heads ({self.kv_heads})")
        if min(self.layers, self.intermediate_size, self.codebooks, self.codebook_size, self.max_positions) <= 0:
            raise ValueError("TalkerConfig: layers, intermediate_size, codebooks, codebook_size and max_positions "
                             "must be positive")


@dataclasses.dataclass
class TalkerBatch:
    hidden: torch.Tensor      # [B, N, thinker_hidden] thinker hidden states at the answer tokens, left-padded
    text: torch.Tensor        # [B, N, thinker_hidden] the thinker's embeddings of the answer tokens, left-padded
    text_mask: torch.Tensor   # [B, N] 1 on answer tokens
    steps: torch.Tensor       # [B, K, S] delayed codes, right-padded with PAD
    steps_mask: torch.Tensor  # [B, S] 1 on real steps


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], codebook_size: int) -> TalkerBatch:
    """(hidden [N_i, H], text embeddings [N_i, H], codes [K, T_i]) per answer -> one batch."""
    n = max(h.shape[0] for h, _, _ in samples)
    delayed = [delay(codes, codebook_size) for _, _, codes in samples]
    s = max(d.shape[1] for d in delayed)
    b, k, width = len(samples), delayed[0].shape[0], samples[0][0].shape[1]
    batch = TalkerBatch(hidden=torch.zeros(b, n, width), text=torch.zeros(b, n, width),
                        text_mask=torch.zeros(b, n, dtype=torch.long),
                        steps=torch.full((b, k, s), pad_id(codebook_size), dtype=torch.long),
                        steps_mask=torch.zeros(b, s, dtype=torch.long))
    for i, ((hidden, text, _), d) in enumerate(zip(samples, delayed)):
        m = hidden.shape[0]
        batch.hidden[i, n - m:], batch.text[i, n - m:], batch.text_mask[i, n - m:] = hidden, text, 1
        batch.steps[i, :, :d.shape[1]], batch.steps_mask[i, :d.shape[1]] = d, 1
    return batch


def targets(batch: TalkerBatch, codebook_size: int) -> torch.Tensor:
    """[B, S, K] labels: the delayed codes, IGNORE on padding and on each codebook's leading PADs
    (fixed by the pattern)."""
    labels = batch.steps.transpose(1, 2).clone()
    labels[labels == pad_id(codebook_size)] = IGNORE
    labels[batch.steps_mask == 0] = IGNORE
    return labels


class Talker(nn.Module):
    def __init__(self, config: TalkerConfig, thinker_hidden_size: int):
        super().__init__()
        self.config = config
        self.vocab = config.codebook_size + 2  # codes, PAD, EOS
        self.speech_start = config.codebooks * self.vocab  # one id past every codebook's embeddings
        self.decoder = Qwen2Model(Qwen2Config(
            vocab_size=self.speech_start + 1, hidden_size=config.hidden_size, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.max_positions,
            tie_word_embeddings=False))
        self.from_hidden = nn.Linear(thinker_hidden_size, config.hidden_size)
        self.from_text = nn.Linear(thinker_hidden_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.codebooks * self.vocab, bias=False)

    def embed_steps(self, steps: torch.Tensor) -> torch.Tensor:
        """[B, K, S] delayed codes -> [B, S, hidden]: the sum of the K codebooks' embeddings."""
        # each codebook's ids start at its own offset; computed here, not a buffer, which transformers'
        # from_pretrained (an export's remote code) would leave uninitialised
        offsets = torch.arange(self.config.codebooks, device=steps.device) * self.vocab
        return self.decoder.embed_tokens(steps + offsets[None, :, None]).sum(dim=1)

    def prefix(self, batch: TalkerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditioning + speech-start embeddings [B, N + 1, hidden] and their mask."""
        cond = self.from_hidden(batch.hidden) + self.from_text(batch.text)
        start = self.decoder.embed_tokens(torch.full((cond.shape[0], 1), self.speech_start, device=cond.device))
        mask = torch.cat([batch.text_mask, torch.ones_like(batch.text_mask[:, :1])], dim=1)
        return torch.cat([cond * batch.text_mask[..., None], start], dim=1), mask

    def logits(self, embeds: torch.Tensor, mask: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """[B, L, hidden] inputs -> [B, L, K, vocab]. `cache`: the keys and values of the positions
        before `embeds` (`mask` covers them too), extended in place (generation)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - embeds.shape[1]:]
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=cache is not None).last_hidden_state
        return self.head(out).unflatten(-1, (self.config.codebooks, self.vocab))

    def teacher_forced(self, batch: TalkerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, S, K, vocab] of every step given the true steps before it, and their labels [B, S, K]."""
        prefix, prefix_mask = self.prefix(batch)
        steps = batch.steps.shape[2]
        embeds = torch.cat([prefix, self.embed_steps(batch.steps[:, :, :-1])], dim=1)
        mask = torch.cat([prefix_mask, batch.steps_mask[:, :-1]], dim=1)
        return self.logits(embeds, mask)[:, -steps:], targets(batch, self.config.codebook_size)  # N + j predicts j

    def forward(self, batch: TalkerBatch, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over every predicted code (teacher forcing): their mean, or their sum
        (`reduction="sum"`, for a trainer that divides by the codes of the whole step)."""
        logits, labels = self.teacher_forced(batch)
        return F.cross_entropy(logits.reshape(-1, self.vocab).float(), labels.reshape(-1), ignore_index=IGNORE,
                               reduction=reduction)

    @torch.no_grad()
    def generate(self, batch: TalkerBatch, max_frames: int) -> list[torch.Tensor]:
        """Greedy codes [K, T_i] per answer. The pattern's fixed ids are forced (PAD before a codebook
        starts, EOS after it ends); codebook 0 decides the end, at `max_frames` at the latest."""
        steps = torch.stack(list(self.steps(batch, max_frames)), dim=2)
        return [undelay(steps[i], self.config.codebook_size) for i in range(steps.shape[0])]

    @torch.no_grad()
    def stream(self, batch: TalkerBatch, max_frames: int) -> Iterator[torch.Tensor]:
        """`generate`'s codes of one answer, frame by frame: each frame [K] as soon as its last
        codebook is out (the delay pattern puts it K - 1 steps after its first)."""
        if batch.hidden.shape[0] != 1:
            raise ValueError(f"Talker.stream: one answer at a time, got a batch of {batch.hidden.shape[0]}")
        k, eos = self.config.codebooks, eos_id(self.config.codebook_size)
        recent: list[torch.Tensor] = []  # the last K steps' columns [K]
        for step, col in enumerate(self.steps(batch, max_frames)):
            recent = [*recent[-(k - 1):], col[0]] if k > 1 else [col[0]]
            if step < k - 1:
                continue
            if recent[0][0] == eos:  # codebook 0 of this frame says the speech has ended
                return
            yield torch.stack([recent[book][book] for book in range(k)])

    @torch.no_grad()
    def steps(self, batch: TalkerBatch, max_frames: int) -> Iterator[torch.Tensor]:
        """The greedy delayed steps [B, K], one per decoder call (KV-cached), until every answer's
        last codebook has said EOS."""
        k, size = self.config.codebooks, self.config.codebook_size
        embeds, mask = self.prefix(batch)
        b = embeds.shape[0]
        end = torch.full((b,), max_frames, device=embeds.device)  # frames per answer, once codebook 0 says EOS
        cache = DynamicCache()
        for step in range(max_frames + k):
            scores = self.logits(embeds, mask, cache)[:, -1]  # [B, K, vocab]; embeds: the positions not cached
            scores[:, :, pad_id(size)] = -torch.inf
            scores[:, 1:, eos_id(size)] = -torch.inf
            if step >= max_frames:
                scores[:, 0, :size] = -torch.inf
            col = scores.argmax(-1)
            end = torch.where((col[:, 0] == eos_id(size)) & (end > step), torch.full_like(end, step), end)
            books = torch.arange(k, device=embeds.device)
            col[books[None, :].expand(b, k) > step] = pad_id(size)
            col[(step >= end[:, None] + books[None, :])] = eos_id(size)
            yield col
            if bool((step >= end + k - 1).all()):
                return
            embeds = self.embed_steps(col[:, :, None])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

"""speech_out: the talker learns to speak the answer (docs/speech_out.md). Each sample's assistant
reply is run through the thinker teacher-forced (frozen unless the stage's globs train it too); the
thinker's hidden states and embeddings at the reply's tokens condition the talker, whose loss is the
cross-entropy over the codec codes of the sample's spoken answer (`answer.wav`). The tiny codec is
fitted on the corpus's spoken answers when the model does not hold one yet, and is saved with it.
Held-out: the talker's loss and codec-frame accuracy (teacher-forced) on held-out spoken answers."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import islice

import torch

from omni.align.objectives.base import Objective, fill
from omni.config import ConfigError
from omni.data.loader import SkipCounter, split_stream
from omni.data.manifest import load_manifest
from omni.data.records import record_from_raw, sft_example
from omni.errors import SampleError
from omni.modalities import SPOKEN_ANSWER
from omni.model.processor import Batch, collate
from omni.model.speech import (
    answer_wave,
    code_count,
    fit_codec,
    load_codec,
    teacher_forced_scores,
    thinker_states,
)

log = logging.getLogger(__name__)
FIT_PER_DATASET = 64  # samples read per dataset to fit the tiny codec (distinct spoken answers are what count)
CACHE = 4096          # codes kept per distinct spoken answer (the synthetic corpus repeats its answers)


@dataclass
class SpeechBatch:
    thinker: Batch               # the samples as SFT sees them; labels mark the reply's tokens
    codes: list[torch.Tensor]    # codec codes [codebooks, frames] of each reply spoken

    @property
    def media(self):
        return self.thinker.media

    @property
    def input_ids(self):
        return self.thinker.input_ids

    def to(self, device) -> "SpeechBatch":
        return SpeechBatch(self.thinker.to(device), self.codes)


class SpeechOut(Objective):
    name = "speech_out"

    def prepare(self, model, tokenizer, processor, out_dir, train, evals, world):
        module = super().prepare(model, tokenizer, processor, out_dir, train, evals, world)
        if model.talker is None:
            raise ConfigError("method speech_out trains the talker, and this model has none: add "
                              "`talker.enabled=true` to the stage's model_overrides")
        if model.codec is None:
            model.codec = load_codec(model.config, None) or fit_codec(model.config.talker, self._fit_spoken(train),
                                                                      self.cfg.seed)
        self.codec, self.codebook_size = model.codec, model.config.talker.codebook_size
        self._codes: dict[bytes, torch.Tensor] = {}
        return module

    def _fit_spoken(self, train: list | None) -> list[bytes]:
        """Distinct spoken answers of the first samples of each training dataset."""
        data = self.cfg.data
        if train is not None:
            records = train
        else:
            entries = load_manifest(data.manifest).select(data.split, list(data.datasets) or None)
            counter = SkipCounter(max_fraction=0.5)
            records = [record_from_raw(raw) for e in entries for raw in islice(split_stream(e, counter),
                                                                               FIT_PER_DATASET)]
        spoken = {r["__speech__"] for r in records if "__speech__" in r}
        if not spoken:
            raise ConfigError(f"{data.manifest or data.records}: no sample has a spoken answer ({SPOKEN_ANSWER}) to "
                              "fit the tiny codec on; write the corpus with `omni synth --voice en`")
        log.info("fitting the tiny codec on %d distinct spoken answers", len(spoken))
        return sorted(spoken)

    def answer_codes(self, record: dict) -> torch.Tensor:
        """The codec codes of the record's spoken answer (cached per distinct recording)."""
        data = record.get("__speech__")
        if data is None:
            raise SampleError(f"{record.get('__where__')}: no spoken answer ({SPOKEN_ANSWER}) for speech_out; write "
                              "the corpus with `omni synth --voice en` or add the reply as audio")
        key = hashlib.sha1(data).digest()
        if key not in self._codes:
            try:
                wave = answer_wave(data, self.codec.sample_rate)
            except ValueError as e:
                raise SampleError(f"{record.get('__where__')}: field '{SPOKEN_ANSWER}' does not decode ({e})") from None
            if len(self._codes) >= CACHE:
                self._codes.clear()
            self._codes[key] = self.codec.encode(wave)
        return self._codes[key]

    def make(self, record):
        return sft_example(self.processor, record, "last"), self.answer_codes(record)

    def collate(self, made):
        batch = collate([e for e, _ in made], self.tokenizer.pad_token_id)
        return SpeechBatch(batch, [c for _, c in made]), fill(batch)

    def units(self, batch) -> int:
        return code_count(batch.codes, self.codebook_size)

    def lengths(self, made):
        return [len(e.input_ids) for e, _ in made]

    def loss(self, module, batch, denom, blank=()):
        t = batch.thinker
        out = module(t.input_ids, t.attention_mask, t.labels, t.media, position_ids=t.position_ids,
                     num_items_in_batch=denom, blank=blank, speech=batch.codes)
        return out.loss, {}

    def eval_batch(self, records):
        return self.collate([self.make(r) for r in records])[0].to(self.device)

    @torch.no_grad()
    def score(self, module, batch, blank=()):
        t = batch.thinker
        states = thinker_states(module, t.input_ids, t.attention_mask, t.labels, t.media, blank=blank)
        loss, right, scored = teacher_forced_scores(module, states, batch.codes)
        return {"loss": loss / max(scored, 1), "frame_accuracy": right / max(scored, 1), "codes": scored}

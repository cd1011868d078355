"""The objectives a stage trains with (`method:` in its config), run by omni's one trainer
(omni/train/trainer.py) on any engine: SFT — what every omni stage does — DPO (with IPO /
length-normalised / SimPO variants) and the Bradley-Terry reward model.

A method turns records (omni/align/data.py: chat or preference, from JSONL or from the stage's
WebDataset stream) into micro-batches and a micro-batch into a *summed* loss over its units
(label tokens for SFT, pairs for DPO/RM) divided by the units of the whole step over all
processes, so any split of a step into micro-batches and processes gives the same gradient.
It also scores held-out records before, during and after training.

SFT  loss on assistant tokens only, every assistant turn (`sft.turns: all`) or the last one
     (`last`); system messages and multi-turn history are context. Packing (`batch.tokens_per_pack`)
     reuses omni's packer. Held-out: token-mean loss and next-token accuracy on assistant tokens.
DPO  policy = the omni model being trained; reference = `dpo.reference` (default `init_from`),
     frozen. With `dpo.precompute_ref` the reference scores every train and held-out pair once
     (cached in `ref_logps.pt`, reused on resume) and is then freed, so training holds one model.
     Held-out: loss, implicit reward margin/accuracy, and the policy's own log-prob margin
     log p(chosen) - log p(rejected) (total and per token).
RM   a value head (Linear(hidden, 1)) on the LLM's last hidden state at the final token of
     prompt + reply, Bradley-Terry loss; held-out: pairwise accuracy and reward margin. The folder
     is an omni model folder plus `value_head.safetensors` (`RewardModel.from_pretrained`).
"""
from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.align.losses import REFERENCE_FREE, preference_loss, sequence_logps
from omni.data.packing import collate_packed
from omni.data.records import preference_examples, sft_example
from omni.distributed import World
from omni.model.batch import MediaBatch
from omni.model.fusion import IGNORE
from omni.model.load import load_model
from omni.model.omni_model import OmniModel
from omni.model.processor import Batch, OmniProcessor, collate

log = logging.getLogger(__name__)
HEAD = "value_head.safetensors"


class Method(ABC):
    """What SFT / DPO / RM implement. `module` is the trained nn.Module the engine wraps (the omni
    model, or a wrapper around it offering `save_pretrained(dir, tokenizer, state_dict=None)` and
    `load_weights(dir)`, as OmniModel does)."""
    name = "method"

    def __init__(self, cfg):
        self.cfg = cfg  # omni.train.config.StageConfig

    def prepare(self, model: OmniModel, tokenizer, processor: OmniProcessor, out_dir: Path,
                train: list | None, evals: list, world: World) -> nn.Module:
        """The module to train; `train`: the in-memory training records (None when streamed)."""
        self.tokenizer, self.processor, self.world, self.device = tokenizer, processor, world, world.device
        return model

    def trainable(self, globs: list[str]) -> list[str]:
        return globs

    @abstractmethod
    def make(self, record: dict):
        """One record -> what `collate` takes (raise on a bad record: it is skipped and counted)."""

    @abstractmethod
    def collate(self, made: list) -> tuple[object, float]:
        """Made records -> (one batch with `.to(device)` and `.media`, its fill: real tokens / batch tokens)."""

    @abstractmethod
    def units(self, batch) -> int:
        """What the loss is normalised by (tokens or pairs) in this batch."""

    @abstractmethod
    def lengths(self, made: list) -> list[int]:
        """Token count of every sequence the made records run (model FLOPs)."""

    @abstractmethod
    def loss(self, module, batch, denom: float, blank: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict]:
        """Summed loss of the batch / denom, and stats (floats) for the log. `blank`: modalities to
        run on a blank input (engines that shard per module; OmniModel.embed)."""

    @torch.no_grad()
    def evaluate(self, module, records: list) -> dict:
        return {}


def _chunks(items: list, n: int):
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + n]


def _fill(batch: Batch) -> float:
    return float(batch.attention_mask.float().mean())


# ================================================================ SFT
class SFT(Method):
    name = "sft"

    def make(self, record):
        return sft_example(self.processor, record, self.cfg.sft.turns)

    def collate(self, made):
        pad = self.tokenizer.pad_token_id
        if self.cfg.batch.tokens_per_pack:
            return collate_packed(made, self.cfg.batch.tokens_per_pack, pad)
        batch = collate(made, pad)
        return batch, _fill(batch)

    def units(self, batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE).sum())

    def lengths(self, made):
        return [len(e.input_ids) for e in made]

    def loss(self, module, batch, denom, blank=()):
        out = module(batch.input_ids, batch.attention_mask, batch.labels, batch.media,
                     position_ids=batch.position_ids, num_items_in_batch=denom, blank=blank)
        return out.loss, {}

    @torch.no_grad()
    def evaluate(self, module, records):
        total = correct = count = 0.0
        for chunk in _chunks(records, self.cfg.batch.micro_batch):
            batch = collate([self.make(r) for r in chunk], self.tokenizer.pad_token_id).to(self.device)
            logits = module(batch.input_ids, batch.attention_mask, media=batch.media).logits[:, :-1].float()
            target = batch.labels[:, 1:]
            mask = target != IGNORE
            total += float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
            correct += float((logits.argmax(-1)[mask] == target[mask]).sum())
            count += float(mask.sum())
        return {"loss": total / max(count, 1), "token_accuracy": correct / max(count, 1), "tokens": int(count)}


# ================================================================ preference batches
@dataclass
class PairBatch:
    batch: Batch                          # 2B rows: the B chosen, then the B rejected
    ref: torch.Tensor | None = None       # [2B] precomputed reference log-probs (same order)

    @property
    def media(self) -> MediaBatch:
        return self.batch.media

    def to(self, device) -> PairBatch:
        return PairBatch(self.batch.to(device), None if self.ref is None else self.ref.to(device))


def _pair_batch(made: list, pad_id: int, ref: torch.Tensor | None = None) -> tuple[PairBatch, float]:
    """Made pairs (where, chosen, rejected) -> the batch and its fill."""
    rows = [c for _, c, _ in made] + [r for _, _, r in made]
    batch = collate(rows, pad_id)
    return PairBatch(batch, ref), _fill(batch)


def policy_logps(module, batch: Batch, blank: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    logits = module(batch.input_ids, batch.attention_mask, media=batch.media, blank=blank).logits
    return sequence_logps(logits, batch.labels)


class _Pairs(Method):
    """Preference methods: a record is one (prompt, chosen, rejected) pair; the unit is a pair."""

    def make(self, record):
        return (record.get("__where__"), *preference_examples(self.processor, record))

    def units(self, batch) -> int:
        return batch.batch.input_ids.shape[0] // 2

    def lengths(self, made):
        return [len(x.input_ids) for _, c, r in made for x in (c, r)]


# ================================================================ DPO
class DPO(_Pairs):
    name = "dpo"

    def prepare(self, model, tokenizer, processor, out_dir, train, evals, world):
        super().prepare(model, tokenizer, processor, out_dir, train, evals, world)
        d = self.cfg.dpo
        self.reference = None
        self.ref_table: dict[str, torch.Tensor] = {}
        if d.loss_type in REFERENCE_FREE:
            return model
        ref_path = d.reference or self.cfg.init_from
        if ref_path is None:
            raise ValueError("dpo: a reference model is needed; set dpo.reference or init_from")
        self.reference, _ = load_model(ref_path, self.cfg.model_overrides)
        self.reference.to(self.device).eval().requires_grad_(False)
        if d.precompute_ref:
            self.ref_table = self._precompute(out_dir / "ref_logps.pt", ref_path, train or [], evals)
            self.reference = None  # freed: training holds the policy only
        return model

    def _precompute(self, cache: Path, ref_path: str, train: list, evals: list) -> dict[str, torch.Tensor]:
        """Reference log-probs [chosen, rejected] of every train and held-out pair, by the record's
        `__where__`; each rank scores every world-th pair and all ranks then hold the whole table;
        cached (reused on resume while the reference and data are the same)."""
        key = json.dumps([str(ref_path), self.cfg.model_overrides, self.cfg.data.records, self.cfg.data.eval,
                          len(train), len(evals)])
        if cache.is_file():
            saved = torch.load(cache, weights_only=False)
            if saved.get("key") == key:
                log.info("reference log-probs from %s", cache)
                return saved["table"]
        table = {}
        with torch.no_grad():
            for chunk in _chunks((train + evals)[self.world.rank::self.world.size], self.cfg.batch.micro_batch):
                made = [self.make(r) for r in chunk]
                pairs = _pair_batch(made, self.tokenizer.pad_token_id)[0].batch.to(self.device)
                lp, _ = policy_logps(self.reference, pairs)
                c, r = lp.chunk(2)
                table.update({w: torch.stack([a, b]).cpu() for (w, _, _), a, b in zip(made, c, r)})
        table = {w: lp for part in self.world.gather(table) for w, lp in part.items()}
        if self.world.main:
            tmp = cache.with_name(f".{cache.name}.tmp")
            torch.save({"key": key, "table": table}, tmp)
            tmp.replace(cache)
        log.info("reference log-probs of %d train / %d held-out pairs -> %s", len(train), len(evals), cache)
        return table

    def _ref(self, made) -> torch.Tensor | None:
        if not self.ref_table:
            return None
        pairs = torch.stack([self.ref_table[w] for w, _, _ in made])
        return torch.cat([pairs[:, 0], pairs[:, 1]])

    def collate(self, made):
        return _pair_batch(made, self.tokenizer.pad_token_id, self._ref(made))

    def _losses(self, module, pb: PairBatch, blank=()):
        d = self.cfg.dpo
        lp, n = policy_logps(module, pb.batch, blank)
        pc, pr = lp.chunk(2)
        lc, lr = n.chunk(2)
        rc = rr = None
        if d.loss_type not in REFERENCE_FREE:
            if pb.ref is not None:
                ref = pb.ref
            else:
                with torch.no_grad():
                    ref, _ = policy_logps(self.reference, pb.batch)
            rc, rr = ref.chunk(2)
        losses, cr, rj = preference_loss(d.loss_type, d.beta, pc, pr, rc, rr, lc, lr, d.gamma)
        return losses, cr, rj, pc.detach(), pr.detach(), lc, lr

    def loss(self, module, batch, denom, blank=()):
        losses, cr, rj, pc, pr, _, _ = self._losses(module, batch, blank)
        return losses.sum() / denom, {"reward_margin": float((cr - rj).mean()),
                                      "reward_accuracy": float((cr > rj).float().mean()),
                                      "logp_margin": float((pc - pr).mean())}

    @torch.no_grad()
    def evaluate(self, module, records):
        acc = {"loss": [], "margin": [], "correct": [], "logp": [], "logp_tok": []}
        for chunk in _chunks(records, self.cfg.batch.micro_batch):
            made = [self.make(r) for r in chunk]
            pb = _pair_batch(made, self.tokenizer.pad_token_id, self._ref(made))[0]
            losses, cr, rj, pc, pr, lc, lr = self._losses(module, pb.to(self.device))
            acc["loss"] += losses.tolist()
            acc["margin"] += (cr - rj).tolist()
            acc["correct"] += (cr > rj).float().tolist()
            acc["logp"] += (pc - pr).tolist()
            acc["logp_tok"] += (pc / lc.clamp(min=1) - pr / lr.clamp(min=1)).tolist()
        mean = lambda xs: sum(xs) / max(len(xs), 1)
        return {"loss": mean(acc["loss"]), "reward_margin": mean(acc["margin"]),
                "reward_accuracy": mean(acc["correct"]), "logp_margin": mean(acc["logp"]),
                "logp_margin_per_token": mean(acc["logp_tok"]), "pairs": len(acc["loss"])}


# ================================================================ reward model
class RewardModel(nn.Module):
    """r(prompt, reply) = value_head(h_last): the LLM's final hidden state at the last real token."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.model = model
        hidden = model.llm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, media=None, blank: tuple[str, ...] = ()):
        embeds = self.model.embed(input_ids, media, blank)
        hidden = self.model.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1  # right padding: the final real token
        return self.value_head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1)

    @torch.no_grad()
    def score(self, processor, conversations: list[list[dict]], media: list[dict] | None = None) -> list[float]:
        """Rewards of full conversations (each ending with the assistant reply to score)."""
        examples = [processor(c, (media or [None] * len(conversations))[i]) for i, c in enumerate(conversations)]
        batch = collate(examples, processor.tokenizer.pad_token_id).to(next(self.parameters()).device)
        return self(batch.input_ids, batch.attention_mask, batch.media).tolist()

    def save_pretrained(self, out_dir, tokenizer, state_dict: dict | None = None) -> None:
        """An omni model folder plus the head; `state_dict`: full weights gathered from a sharded engine."""
        from safetensors.torch import save_file, save_model

        if state_dict is None:
            self.model.save_pretrained(out_dir, tokenizer)
            save_model(self.value_head, str(Path(out_dir) / HEAD))
        else:
            inner = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
            self.model.save_pretrained(out_dir, tokenizer, state_dict=inner)
            head = {k.removeprefix("value_head."): v.contiguous() for k, v in state_dict.items()
                    if k.startswith("value_head.")}
            save_file(head, str(Path(out_dir) / HEAD))
        (Path(out_dir) / "reward.json").write_text(json.dumps({"kind": "bradley-terry", "head": HEAD}))

    def load_weights(self, path) -> None:
        from safetensors.torch import load_model

        self.model.load_weights(path)
        load_model(self.value_head, str(Path(path) / HEAD))

    @classmethod
    def from_pretrained(cls, path) -> tuple[RewardModel, object]:
        if not (Path(path) / HEAD).is_file():
            raise FileNotFoundError(f"{path}: not a reward model folder (no {HEAD}; train one with `omni align rm`)")
        model, tok = load_model(path)
        rm = cls(model)
        rm.load_weights(path)
        return rm, tok


class RM(_Pairs):
    name = "rm"

    def prepare(self, model, tokenizer, processor, out_dir, train, evals, world):
        super().prepare(model, tokenizer, processor, out_dir, train, evals, world)
        return RewardModel(model)

    def trainable(self, globs):
        return [f"model.{g}" for g in globs] + ["value_head.*"]

    def collate(self, made):
        return _pair_batch(made, self.tokenizer.pad_token_id)

    def _rewards(self, module, pb: PairBatch, blank=()):
        r = module(pb.batch.input_ids, pb.batch.attention_mask, pb.batch.media, blank)
        return r.chunk(2)

    def loss(self, module, batch, denom, blank=()):
        rc, rr = self._rewards(module, batch, blank)
        per = -F.logsigmoid(rc - rr) + self.cfg.rm.center_rewards * (rc + rr) ** 2
        margin = (rc - rr).detach()
        return per.sum() / denom, {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}

    @torch.no_grad()
    def evaluate(self, module, records):
        margins = []
        for chunk in _chunks(records, self.cfg.batch.micro_batch):
            pb = _pair_batch([self.make(r) for r in chunk], self.tokenizer.pad_token_id)[0]
            rc, rr = self._rewards(module, pb.to(self.device))
            margins += (rc - rr).tolist()
        t = torch.tensor(margins)
        return {"accuracy": float((t > 0).float().mean()), "margin": float(t.mean()),
                "loss": float(-F.logsigmoid(t).mean()), "pairs": len(margins)}


METHOD_CLASSES = {"sft": SFT, "dpo": DPO, "rm": RM}

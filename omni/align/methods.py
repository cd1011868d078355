"""SFT, DPO (with IPO / length-normalised / SimPO variants) and the Bradley-Terry reward model,
as `Method`s of the one align loop (omni/align/loop.py).

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.align.data import preference_examples, sft_example
from omni.align.loop import Method
from omni.align.losses import REFERENCE_FREE, preference_loss, sequence_logps
from omni.model import OmniModel
from omni.packing import collate_packed
from omni.processor import IGNORE, Batch, collate

log = logging.getLogger(__name__)
HEAD = "value_head.safetensors"


def _chunks(items: list, n: int):
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + n]


# ================================================================ SFT
class SFT(Method):
    name = "sft"

    def make(self, index, record):
        return sft_example(self.processor, record, self.cfg.sft.turns)

    def collate(self, made):
        pad = self.tokenizer.pad_token_id
        if self.cfg.batch.tokens_per_pack:
            return collate_packed(made, self.cfg.batch.tokens_per_pack, pad)[0]
        return collate(made, pad)

    def units(self, batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE).sum())

    def loss(self, module, batch, denom):
        out = module(batch.input_ids, batch.attention_mask, batch.labels, batch.media,
                     position_ids=batch.position_ids, num_items_in_batch=denom)
        return out.loss, {}

    @torch.no_grad()
    def evaluate(self, module, records):
        total = correct = count = 0.0
        for chunk in _chunks(records, self.cfg.batch.micro_batch):
            batch = collate([self.make(0, r) for r in chunk], self.tokenizer.pad_token_id).to(self.device)
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

    def to(self, device) -> PairBatch:
        return PairBatch(self.batch.to(device), None if self.ref is None else self.ref.to(device))


def _pair_batch(made: list, pad_id: int, ref: torch.Tensor | None = None) -> PairBatch:
    rows = [c for _, c, _ in made] + [r for _, _, r in made]
    return PairBatch(collate(rows, pad_id), ref)


def policy_logps(module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = module(batch.input_ids, batch.attention_mask, media=batch.media).logits
    return sequence_logps(logits, batch.labels)


# ================================================================ DPO
class DPO(Method):
    name = "dpo"

    def prepare(self, model, tokenizer, processor, out_dir, train, evals, device):
        super().prepare(model, tokenizer, processor, out_dir, train, evals, device)
        d = self.cfg.dpo
        self.reference = None
        self.ref_table: dict[str, torch.Tensor] = {}
        if d.loss_type in REFERENCE_FREE:
            return model
        ref_path = d.reference or self.cfg.init_from
        self.reference, _ = OmniModel.from_pretrained(ref_path, self.cfg.model_overrides)
        self.reference.to(device).eval().requires_grad_(False)
        if d.precompute_ref:
            self.ref_table = self._precompute(out_dir / "ref_logps.pt", ref_path, train, evals)
            self.reference = None  # freed: training holds the policy only
        return model

    def _precompute(self, cache: Path, ref_path: str, train: list, evals: list) -> dict[str, torch.Tensor]:
        key = json.dumps([str(ref_path), self.cfg.model_overrides, self.cfg.data.train, self.cfg.data.eval,
                          len(train), len(evals)])
        if cache.is_file():
            saved = torch.load(cache, weights_only=False)
            if saved.get("key") == key:
                log.info("reference log-probs from %s", cache)
                return saved["table"]
        table = {}
        for name, records in (("train", train), ("eval", evals)):
            rows = []
            with torch.no_grad():
                for chunk in _chunks(list(enumerate(records)), self.cfg.batch.micro_batch):
                    made = [(i, *preference_examples(self.processor, r)) for i, r in chunk]
                    pairs = _pair_batch(made, self.tokenizer.pad_token_id).batch.to(self.device)
                    lp, _ = policy_logps(self.reference, pairs)
                    c, r = lp.chunk(2)
                    rows.append(torch.stack([c, r], dim=1).cpu())
            table[name] = torch.cat(rows) if rows else torch.zeros(0, 2)
        torch.save({"key": key, "table": table}, cache)
        log.info("reference log-probs of %d train / %d held-out pairs -> %s", len(train), len(evals), cache)
        return table

    def make(self, index, record):
        return (index, *preference_examples(self.processor, record))

    def collate(self, made):
        ref = None
        if self.ref_table:
            pairs = self.ref_table["train"][[i for i, _, _ in made]]
            ref = torch.cat([pairs[:, 0], pairs[:, 1]])
        return _pair_batch(made, self.tokenizer.pad_token_id, ref)

    def units(self, batch) -> int:
        return batch.batch.input_ids.shape[0] // 2

    def _losses(self, module, pb: PairBatch):
        d = self.cfg.dpo
        lp, n = policy_logps(module, pb.batch)
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

    def loss(self, module, batch, denom):
        losses, cr, rj, pc, pr, _, _ = self._losses(module, batch)
        return losses.sum() / denom, {"reward_margin": float((cr - rj).mean()),
                                      "reward_accuracy": float((cr > rj).float().mean()),
                                      "logp_margin": float((pc - pr).mean())}

    @torch.no_grad()
    def evaluate(self, module, records):
        acc = {"loss": [], "margin": [], "correct": [], "logp": [], "logp_tok": []}
        for chunk in _chunks(list(enumerate(records)), self.cfg.batch.micro_batch):
            made = [(i, *preference_examples(self.processor, r)) for i, r in chunk]
            ref = None
            if self.ref_table:
                pairs = self.ref_table["eval"][[i for i, _ in chunk]]
                ref = torch.cat([pairs[:, 0], pairs[:, 1]])
            losses, cr, rj, pc, pr, lc, lr = self._losses(module, _pair_batch(made, self.tokenizer.pad_token_id,
                                                                                ref).to(self.device))
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

    def forward(self, input_ids, attention_mask, media=None):
        embeds = self.model.embed(input_ids, media)
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

    def save_pretrained(self, out_dir, tokenizer) -> None:
        from safetensors.torch import save_model

        self.model.save_pretrained(out_dir, tokenizer)
        save_model(self.value_head, str(Path(out_dir) / HEAD))
        (Path(out_dir) / "reward.json").write_text(json.dumps({"kind": "bradley-terry", "head": HEAD}))

    def load_weights(self, path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(Path(path) / "model.safetensors"))
        load_model(self.value_head, str(Path(path) / HEAD))

    @classmethod
    def from_pretrained(cls, path) -> tuple[RewardModel, object]:
        if not (Path(path) / HEAD).is_file():
            raise FileNotFoundError(f"{path}: not a reward model folder (no {HEAD}; train one with `omni align rm`)")
        model, tok = OmniModel.from_pretrained(path)
        rm = cls(model)
        rm.load_weights(path)
        return rm, tok


class RM(Method):
    name = "rm"

    def prepare(self, model, tokenizer, processor, out_dir, train, evals, device):
        super().prepare(model, tokenizer, processor, out_dir, train, evals, device)
        return RewardModel(model)

    def trainable(self, globs):
        return [f"model.{g}" for g in globs] + ["value_head.*"]

    def make(self, index, record):
        return (index, *preference_examples(self.processor, record))

    def collate(self, made):
        return _pair_batch(made, self.tokenizer.pad_token_id)

    def units(self, batch) -> int:
        return batch.batch.input_ids.shape[0] // 2

    def _rewards(self, module, pb: PairBatch):
        r = module(pb.batch.input_ids, pb.batch.attention_mask, pb.batch.media)
        return r.chunk(2)

    def loss(self, module, batch, denom):
        rc, rr = self._rewards(module, batch)
        per = -F.logsigmoid(rc - rr) + self.cfg.rm.center_rewards * (rc + rr) ** 2
        margin = (rc - rr).detach()
        return per.sum() / denom, {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}

    @torch.no_grad()
    def evaluate(self, module, records):
        margins = []
        for chunk in _chunks(list(enumerate(records)), self.cfg.batch.micro_batch):
            made = [(i, *preference_examples(self.processor, r)) for i, r in chunk]
            rc, rr = self._rewards(module, _pair_batch(made, self.tokenizer.pad_token_id).to(self.device))
            margins += (rc - rr).tolist()
        t = torch.tensor(margins)
        return {"accuracy": float((t > 0).float().mean()), "margin": float(t.mean()),
                "loss": float(-F.logsigmoid(t).mean()), "pairs": len(margins)}

    def load_weights(self, module, path):
        module.load_weights(path)


METHOD_CLASSES = {"sft": SFT, "dpo": DPO, "rm": RM}

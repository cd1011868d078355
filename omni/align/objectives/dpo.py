"""DPO, with IPO / length-normalised / SimPO variants (`dpo.loss_type`, omni/align/losses.py).

policy = the omni model being trained; reference = `dpo.reference` (default `init_from`), frozen.
With `dpo.precompute_ref` the reference scores every train and held-out pair once (cached in
`ref_logps.safetensors`, reused on resume) and is then freed, so training holds one model. Held-out: loss,
implicit reward margin/accuracy, and the policy's own log-prob margin log p(chosen) - log p(rejected)
(total and per token).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from omni.align.losses import REFERENCE_FREE, preference_loss
from omni.align.objectives.base import chunks
from omni.align.objectives.pairs import PairBatch, Pairs, pair_batch, policy_logps
from omni.model.load import load_model
from omni.model.omni_model import PRECISION_DTYPE

log = logging.getLogger(__name__)
REF_CACHE = "ref_logps.safetensors"  # tensors and a string key only: nothing to unpickle


class DPO(Pairs):
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
        self.reference.use_attention(PRECISION_DTYPE[self.cfg.precision], self.device)
        if d.precompute_ref:
            self.ref_table = self._precompute(out_dir / REF_CACHE, ref_path, train or [], evals)
            self.reference = None  # freed: training holds the policy only
        return model

    def _precompute(self, cache: Path, ref_path: str, train: list, evals: list) -> dict[str, torch.Tensor]:
        """Reference log-probs [chosen, rejected] of every train and held-out pair, by the record's
        `__where__`; each rank scores every world-th pair and all ranks then hold the whole table;
        cached (reused on resume while the reference and data are the same)."""
        key = json.dumps([str(ref_path), self.cfg.model_overrides, self.cfg.data.records, self.cfg.data.eval,
                          len(train), len(evals)])
        if cache.is_file():
            try:
                with safe_open(str(cache), framework="pt") as f:
                    if (f.metadata() or {}).get("key") == key:
                        log.info("reference log-probs from %s", cache)
                        return {w: f.get_tensor(w) for w in f.keys()}
            except (OSError, ValueError, SafetensorError) as e:  # torn or foreign file: score again
                log.warning("%s is not a reference log-prob table omni wrote (%s); scoring again", cache, e)
        table = {}
        with torch.no_grad():
            for chunk in chunks((train + evals)[self.world.rank::self.world.size], self.cfg.batch.micro_batch):
                made = [self.make(r) for r in chunk]
                pairs = pair_batch(made, self.tokenizer.pad_token_id)[0].batch.to(self.device)
                lp = self._reference_logps(pairs)
                c, r = lp.chunk(2)
                table.update({w: torch.stack([a, b]).cpu() for (w, _, _), a, b in zip(made, c, r)})
        table = {w: lp for part in self.world.gather(table) for w, lp in part.items()}
        if self.world.main:
            tmp = cache.with_name(f".{cache.name}.tmp")
            save_file({w: lp.contiguous() for w, lp in table.items()}, str(tmp), metadata={"key": key})
            tmp.replace(cache)
        log.info("reference log-probs of %d train / %d held-out pairs -> %s", len(train), len(evals), cache)
        return table

    def _reference_logps(self, batch) -> torch.Tensor:
        """The frozen reference's log-probs in the stage's precision (autocast under bf16, the dtype its
        attention backend was chosen for), also where no engine autocasts around it: the pre-compute,
        DeepSpeed (whose autocast wraps the policy's forward only)."""
        bf16 = self.cfg.precision == "bf16"
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return policy_logps(self.reference, batch)[0]

    def _ref(self, made) -> torch.Tensor | None:
        if not self.ref_table:
            return None
        pairs = torch.stack([self.ref_table[w] for w, _, _ in made])
        return torch.cat([pairs[:, 0], pairs[:, 1]])

    def collate(self, made):
        return pair_batch(made, self.tokenizer.pad_token_id, self._ref(made))

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
                ref = self._reference_logps(pb.batch)
            rc, rr = ref.chunk(2)
        losses, cr, rj = preference_loss(d.loss_type, d.beta, pc, pr, rc, rr, lc, lr, d.gamma)
        return losses, cr, rj, pc.detach(), pr.detach(), lc, lr

    def loss(self, module, batch, denom, blank=()):
        losses, cr, rj, pc, pr, _, _ = self._losses(module, batch, blank)
        return losses.sum() / denom, {"reward_margin": float((cr - rj).mean()),
                                      "reward_accuracy": float((cr > rj).float().mean()),
                                      "logp_margin": float((pc - pr).mean())}

    def eval_batch(self, records):
        made = [self.make(r) for r in records]
        return pair_batch(made, self.tokenizer.pad_token_id, self._ref(made))[0].to(self.device)

    @torch.no_grad()
    def score(self, module, batch, blank=()):
        losses, cr, rj, pc, pr, lc, lr = self._losses(module, batch, blank)
        mean = lambda t: float(t.float().mean())
        return {"loss": mean(losses), "reward_margin": mean(cr - rj), "reward_accuracy": mean(cr > rj),
                "logp_margin": mean(pc - pr), "pairs": len(losses),
                "logp_margin_per_token": mean(pc / lc.clamp(min=1) - pr / lr.clamp(min=1))}

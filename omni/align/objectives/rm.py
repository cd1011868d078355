"""The Bradley-Terry reward model: a value head (Linear(hidden, 1)) on the LLM's last hidden state at
the final token of prompt + reply, loss -log sigmoid(r_chosen - r_rejected); held-out: pairwise
accuracy and reward margin. Its folder is an omni model folder plus `value_head.safetensors`
(`RewardModel.from_pretrained`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.align.objectives.pairs import PairBatch, Pairs, pair_batch
from omni.config import ConfigError
from omni.files import file_sha256
from omni.model.integrity import CHECKSUMS, check_recorded
from omni.model.load import load_model
from omni.model.omni_model import OmniModel
from omni.model.processor import collate

HEAD = "value_head.safetensors"
REWARD = "reward.json"


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
        """An omni model folder plus the head (its sha256 in reward.json); `state_dict`: full
        weights gathered from a sharded engine."""
        from safetensors.torch import save_file, save_model

        head = Path(out_dir) / HEAD
        if state_dict is None:
            self.model.save_pretrained(out_dir, tokenizer)
            save_model(self.value_head, str(head))
        else:
            inner = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
            self.model.save_pretrained(out_dir, tokenizer, state_dict=inner)
            save_file({k.removeprefix("value_head."): v.contiguous() for k, v in state_dict.items()
                       if k.startswith("value_head.")}, str(head))
        (Path(out_dir) / REWARD).write_text(json.dumps({"kind": "bradley-terry", "head": HEAD,
                                                        CHECKSUMS: {HEAD: file_sha256(head)}}))

    def load_weights(self, path) -> None:
        self.model.load_weights(path)
        self._load_head(path)

    def _load_head(self, path) -> None:
        """The value head, once it matches the sha256 reward.json recorded."""
        from safetensors.torch import load_model

        head, meta = Path(path) / HEAD, Path(path) / REWARD
        try:
            recorded = json.loads(meta.read_text()).get(CHECKSUMS) if meta.is_file() else None
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{meta}: not readable JSON ({e}); the folder is damaged") from None
        check_recorded(head, recorded)
        try:
            load_model(self.value_head, str(head))
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a torn file or other keys
            raise ConfigError(f"{head}: cannot be read into the reward head ({type(e).__name__}: {e})") from None

    @classmethod
    def from_pretrained(cls, path) -> tuple[RewardModel, object]:
        if not (Path(path) / HEAD).is_file():
            raise FileNotFoundError(f"{path}: not a reward model folder (no {HEAD}; train one with `omni align rm`)")
        model, tok = load_model(path)
        rm = cls(model)
        rm._load_head(path)
        return rm, tok


class RM(Pairs):
    name = "rm"

    def wrap(self, model):
        return RewardModel(model)

    def trainable(self, globs):
        return [f"model.{g}" for g in globs] + ["value_head.*"]

    def collate(self, made):
        return pair_batch(made, self.tokenizer.pad_token_id)

    def _rewards(self, module, pb: PairBatch, blank=()):
        r = module(pb.batch.input_ids, pb.batch.attention_mask, pb.batch.media, blank)
        return r.chunk(2)

    def loss(self, module, batch, denom, blank=()):
        rc, rr = self._rewards(module, batch, blank)
        per = -F.logsigmoid(rc - rr) + self.cfg.rm.center_rewards * (rc + rr) ** 2
        margin = (rc - rr).detach()
        return per.sum() / denom, {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}

    def eval_batch(self, records):
        return pair_batch([self.make(r) for r in records], self.tokenizer.pad_token_id)[0].to(self.device)

    @torch.no_grad()
    def score(self, module, batch, blank=()):
        rc, rr = self._rewards(module, batch, blank)
        t = (rc - rr).float()
        return {"accuracy": float((t > 0).float().mean()), "margin": float(t.mean()),
                "loss": float(-F.logsigmoid(t).mean()), "pairs": len(t)}

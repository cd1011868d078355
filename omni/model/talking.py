"""What the thinker hands the talker and what the talker says back, shared by OmniModel
(omni/model/speech.py) and the export's `OmniForCausalLM` (torch and the talker only: `omni export`
ships this file as remote code, so an export speaks with the same code as training)."""
from __future__ import annotations

import torch

from omni.model.fusion import IGNORE
from omni.speech.talker import TalkerBatch, collate


def thinker_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                   media, position_ids=None, blank: tuple[str, ...] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, (hidden states [N, H], input embeddings [N, H]) of the thinker at its answer tokens
    (labels != IGNORE), the thinker run teacher-forced on the whole sequence."""
    embeds = model.embed(input_ids, media, blank)
    hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False).last_hidden_state
    text = model.llm.get_input_embeddings()(input_ids)
    answer = labels != IGNORE
    return [(hidden[i][answer[i]], text[i][answer[i]]) for i in range(input_ids.shape[0])]


def talker_batch(states: list[tuple[torch.Tensor, torch.Tensor]], codes: list[torch.Tensor], codebook_size: int,
                 blank_thinker: bool = False) -> TalkerBatch:
    """The talker's batch for these answers (`collate`'s layout), keeping the conditioning's autograd
    graph so that a jointly trained thinker gets gradients. `blank_thinker`: everything the thinker
    gives is zero (the control showing that the talker speaks what the thinker says, not a prior)."""
    if blank_thinker:
        states = [(torch.zeros_like(h), torch.zeros_like(t)) for h, t in states]
    device, n = states[0][0].device, max(h.shape[0] for h, _ in states)
    layout = collate([(torch.zeros(h.shape[0], 1), torch.zeros(h.shape[0], 1), c.cpu())
                      for (h, _), c in zip(states, codes, strict=True)], codebook_size)
    pad = lambda x: torch.cat([x.new_zeros(n - x.shape[0], x.shape[1]), x])  # noqa: E731 - left padding
    return TalkerBatch(hidden=torch.stack([pad(h) for h, _ in states]), text=torch.stack([pad(t) for _, t in states]),
                       text_mask=layout.text_mask.to(device), steps=layout.steps.to(device),
                       steps_mask=layout.steps_mask.to(device))


@torch.no_grad()
def speak(model, states, max_frames: int, blank_thinker: bool = False) -> list[torch.Tensor]:
    """Greedy codec codes [K, T] the talker speaks for each answer's thinker states."""
    dummy = [torch.zeros(model.talker.config.codebooks, 0, dtype=torch.long)] * len(states)
    batch = talker_batch(states, dummy, model.talker.config.codebook_size, blank_thinker)
    return model.talker.generate(batch, max_frames)

"""PromptCache: a prompt prefilled piece by piece (and reused across turns) decodes the same greedy
tokens, with the same logits within fp32 rounding, as the whole prompt run at once."""
from __future__ import annotations

import pytest
import torch

from omni.model.prompt_cache import PromptCache


def _embeds(model, ids):
    with torch.no_grad():
        return model.llm.get_input_embeddings()(ids)


def _decode(model, ids, cache=None, tokens=6):
    """Greedy tokens and the logits of each step (end tokens allowed; ids never hit a placeholder)."""
    with torch.no_grad():
        out = model.generate(ids, torch.ones_like(ids), None, prompt_cache=cache, max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_scores=True)
    return out.sequences[0].tolist(), torch.stack(out.scores)


@pytest.fixture
def model(tiny_model):
    m, _ = tiny_model
    return m.eval()


def test_a_prompt_prefilled_in_pieces_decodes_as_the_whole_prompt(model):
    torch.manual_seed(1)
    ids = torch.randint(10, 200, (1, 40))
    want, want_logits = _decode(model, ids)
    cache = PromptCache()
    assert cache.prefill(model.llm, ids[:, :12], _embeds(model, ids[:, :12])) == 12
    assert cache.prefill(model.llm, ids[:, :30], _embeds(model, ids[:, :30]), upto=25) == 13  # only the new ones
    assert len(cache) == 25 and cache.kv.get_seq_length() == 25
    got, logits = _decode(model, ids, cache)
    assert got == want
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert len(cache) == 40 and cache.kv.get_seq_length() == 40  # the prompt is kept, the answer is not


def test_a_changed_position_crops_the_cache_there_and_the_next_turn_reuses_the_last(model):
    torch.manual_seed(2)
    ids = torch.randint(10, 200, (1, 30))
    cache = PromptCache()
    cache.prefill(model.llm, ids, _embeds(model, ids))
    changed = ids.clone()
    changed[0, 17] += 1  # e.g. a camera frame that left the window while the user spoke
    assert cache.matching(changed, _embeds(model, changed)) == 17
    embeds = _embeds(model, changed)
    embeds[0, 5] += 1e-3  # same ids, other content (another frame's features): not a match either
    assert cache.matching(changed, embeds) == 5
    got, logits = _decode(model, changed, cache)
    want, want_logits = _decode(model, changed)
    assert got == want
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    # the next turn: this prompt + the answer + a new question; only the new positions run
    follow = torch.cat([changed, torch.tensor([got[:3]]), torch.randint(10, 200, (1, 7))], 1)
    assert cache.matching(follow, _embeds(model, follow)) == 30
    got2, logits2 = _decode(model, follow, cache)
    want2, want_logits2 = _decode(model, follow)
    assert got2 == want2
    torch.testing.assert_close(logits2, want_logits2, rtol=1e-4, atol=1e-4)


def test_a_failed_prefill_leaves_the_cache_empty(model):
    ids = torch.randint(10, 200, (1, 20))
    cache = PromptCache()
    cache.prefill(model.llm, ids[:, :10], _embeds(model, ids[:, :10]))
    bad = torch.zeros(1, 20, model.llm.config.hidden_size + 1)  # wrong width
    with pytest.raises(RuntimeError):
        cache.prefill(model.llm, ids, bad)
    assert len(cache) == 0 and cache.kv is None
    with pytest.raises(ValueError, match="one prompt at a time"):
        cache.prefill(model.llm, ids.repeat(2, 1), _embeds(model, ids.repeat(2, 1)))

"""Packed rows keep samples isolated and leave the loss unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni.data.packing import collate_packed, first_fit_decreasing
from omni.model.processor import OmniProcessor, collate


def test_first_fit_decreasing_respects_the_budget():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 60, 200)]
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert first_fit_decreasing([100, 10], 64) == [[0], [1]]  # over-long sample: its own row


@pytest.fixture(scope="module")
def examples(tiny_model):
    model, tok = tiny_model
    proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
    rng = np.random.default_rng(1)
    chats = []
    for i, (prompt, answer) in enumerate([("<image> what colour is the shape?", "red"),
                                          ("<audio> which note is played?", "mi"),
                                          ("what is two plus three?", "five"),
                                          ("<video> what colour does the shape turn into?", "blue"),
                                          ("<image> <audio> what colour is the shape there?", "green")]):
        media = {}
        if "<image>" in prompt:
            media["image"] = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))]
        if "<audio>" in prompt:
            media["audio"] = [rng.standard_normal(8000 + 1000 * i).astype(np.float32) * 0.1]
        if "<video>" in prompt:
            media["video"] = [[Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]]
        chats.append(proc([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], media))
    return model, tok, chats


def test_a_sample_packed_with_neighbours_has_the_logits_it_has_alone(examples):
    model, tok, exs = examples
    model.eval()
    packed, fill = collate_packed(exs, budget=160, pad_id=tok.pad_token_id)
    assert packed.input_ids.shape[0] < len(exs) and 0 < fill <= 1
    with torch.no_grad():
        joint = model(packed.input_ids, media=packed.media, position_ids=packed.position_ids).logits
        # find each sample in the packed rows by its position-id run and compare
        found = 0
        for row in range(packed.input_ids.shape[0]):
            starts = (packed.position_ids[row] == 0).nonzero().flatten().tolist()
            for s, e in zip(starts, starts[1:] + [packed.input_ids.shape[1]]):
                ids = packed.input_ids[row, s:e]
                match = [x for x in exs if len(x.input_ids) == len(ids) and torch.equal(x.input_ids, ids)]
                if not match:
                    continue  # the padding tail
                alone = model(ids[None], media=match[0].media).logits[0]
                torch.testing.assert_close(joint[row, s:e], alone, atol=1e-5, rtol=1e-4)
                found += 1
        assert found == len(exs)
        # without the position-id resets the samples would see each other
        flat = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
        leaky = model(packed.input_ids, media=packed.media, position_ids=flat).logits
        assert not torch.allclose(leaky, joint, atol=1e-3)


def test_packed_loss_equals_padded_loss(examples):
    model, tok, exs = examples
    model.eval()
    padded = collate(exs, tok.pad_token_id)
    packed, _ = collate_packed(exs, budget=160, pad_id=tok.pad_token_id)
    with torch.no_grad():
        a = model(padded.input_ids, padded.attention_mask, padded.labels, padded.media).loss
        b = model(packed.input_ids, None, packed.labels, packed.media, position_ids=packed.position_ids).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

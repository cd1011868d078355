"""A packed micro-batch is one padding-free row whose samples stay isolated on every attention
backend (SDPA per sample, SDPA and eager run here; flash_attention_2 gets the single row with
resetting position ids that transformers turns into varlen boundaries), and the loss is the padded
batch's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from omni.data.packing import collate_packed
from omni.model.fusion import IGNORE
from omni.model.omni_model import OmniModel
from omni.model.processor import OmniProcessor, collate
from omni.model.varlen_attention import packed_lengths
from omni.presets import build_preset


@pytest.fixture(scope="module")
def examples():
    """A tiny model of this module's own (the tests switch its attention backend) and one sample of
    each kind: image, audio, text, video, image + audio."""
    torch.manual_seed(0)
    model, tok = OmniModel.from_config(build_preset("tiny"))
    model.eval()
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


def test_a_packed_micro_batch_is_one_padding_free_row(examples):
    _, tok, exs = examples
    lengths = [len(e.input_ids) for e in exs]
    packed, fill = collate_packed(exs)
    assert packed.input_ids.shape == (1, sum(lengths)) and fill == 1.0 and packed.attention_mask is None
    assert torch.equal(packed.input_ids[0], torch.cat([e.input_ids for e in exs]))
    starts = torch.tensor([0, *np.cumsum(lengths)[:-1]])
    assert torch.equal((packed.position_ids[0] == 0).nonzero().flatten(), starts)
    assert (packed.labels[0, starts] == IGNORE).all()  # no sample's first token predicted from its neighbour
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[starts] = False
    assert torch.equal(packed.labels[0, keep], torch.cat([e.labels[1:] for e in exs]))
    assert {m: getattr(packed.media, m) is not None for m in ("image", "video", "audio")} == \
        {"image": True, "video": True, "audio": True}


def test_flash_attention_2_reads_one_varlen_sequence_per_sample(examples):
    """What transformers' flash_attention_2 path does with the batch we hand the LLM: it detects
    packing only for one row, and then derives the sequence boundaries from the position ids."""
    _, _, exs = examples
    packed, _ = collate_packed(exs)
    pos = packed.position_ids
    assert _is_packed_sequence(pos, batch_size=packed.input_ids.shape[0])
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(pos)
    lengths = [len(e.input_ids) for e in exs]
    assert cu_q.tolist() == cu_k.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert int(max_q) == int(max_k) == max(lengths)


def test_sdpa_varlen_cuts_only_a_packed_row_into_its_samples(examples):
    """sdpa_varlen attends per sample where the row is packed, and leaves everything else (one
    sample, padded rows, a KV cache) to SDPA with its mask."""
    _, _, exs = examples
    packed, _ = collate_packed(exs)
    lengths = [len(e.input_ids) for e in exs]
    q = torch.zeros(1, 2, sum(lengths), 8)
    assert packed_lengths(packed.position_ids, q, q) == lengths
    assert packed_lengths(torch.arange(sum(lengths))[None], q, q) is None
    assert packed_lengths(packed.position_ids, q, torch.zeros(1, 2, sum(lengths) + 4, 8)) is None
    assert packed_lengths(packed.position_ids.expand(2, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1)) is None
    assert packed_lengths(None, q, q) is None


@pytest.mark.parametrize("backend", ["sdpa_varlen", "sdpa", "eager"])
def test_a_sample_packed_with_neighbours_has_the_logits_it_has_alone(examples, backend):
    model, _, exs = examples
    model.llm.set_attn_implementation(backend)
    assert model.llm.config._attn_implementation == backend
    packed, _ = collate_packed(exs)
    with torch.no_grad():
        joint = model(packed.input_ids, media=packed.media, position_ids=packed.position_ids).logits[0]
        at = 0
        for e in exs:
            alone = model(e.input_ids[None], media=e.media).logits[0]
            torch.testing.assert_close(joint[at: at + len(e.input_ids)], alone, atol=1e-5, rtol=1e-4)
            at += len(e.input_ids)
        # without the position-id resets the samples would see each other
        flat = torch.arange(packed.input_ids.shape[1])[None]
        leaky = model(packed.input_ids, media=packed.media, position_ids=flat).logits[0]
        assert not torch.allclose(leaky, joint, atol=1e-3)


@pytest.mark.parametrize("backend", ["sdpa_varlen", "sdpa"])
def test_packed_loss_equals_padded_loss(examples, backend):
    model, tok, exs = examples
    model.llm.set_attn_implementation(backend)
    padded = collate(exs, tok.pad_token_id)
    packed, _ = collate_packed(exs)
    with torch.no_grad():
        a = model(padded.input_ids, padded.attention_mask, padded.labels, padded.media).loss
        b = model(packed.input_ids, None, packed.labels, packed.media, position_ids=packed.position_ids).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

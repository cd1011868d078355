"""The chunked LM loss (omni/model/lm_loss.py) gives the plain path's loss and gradients, without
materialising the full logits."""
from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from omni.model.baichuan2 import NormHead, max_z_loss
from omni.model.fusion import IGNORE
from omni.model.lm_loss import chunked_lm_loss


def _plain(hidden, head, labels, num_items, z_coef):
    logits = head(hidden)
    loss = ForCausalLMLoss(logits, labels, head.weight.shape[0], num_items_in_batch=num_items)
    return loss + max_z_loss(logits, labels, z_coef, num_items) if z_coef else loss


@pytest.mark.parametrize("norm_head,z_coef,num_items", [(False, 0.0, None), (True, 2e-4, 23.0), (False, 1e-2, 40.0)])
def test_chunked_loss_and_gradients_equal_the_plain_ones(norm_head, z_coef, num_items):
    torch.manual_seed(0)
    vocab, dim = 50, 16
    head = (NormHead if norm_head else torch.nn.Linear)(dim, vocab, bias=False)
    hidden = torch.randn(2, 37, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 37))
    labels[0, :9] = IGNORE
    labels[1, 20:] = IGNORE
    results = []
    for chunked in (False, True):
        hidden.grad, head.weight.grad = None, None
        if chunked:  # 7 rows per chunk: several chunks, the last one short
            loss = chunked_lm_loss(hidden, head, labels, num_items, z_coef, chunk_logits=7 * vocab)
        else:
            loss = _plain(hidden, head, labels, num_items, z_coef)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for plain, chunk in zip(*results):
        torch.testing.assert_close(chunk, plain, rtol=1e-6, atol=1e-7)


def test_the_model_takes_the_chunked_path_above_its_threshold_with_the_same_loss_and_gradients():
    from omni.data.packing import collate_packed
    from omni.model.omni_model import OmniModel
    from omni.model.processor import OmniProcessor
    from omni.presets import build_preset

    results = []
    for above in (None, 0):
        torch.manual_seed(0)
        model, tok = OmniModel.from_config(build_preset("tiny", ["llm.max_z_loss=2e-4"]))
        if above is not None:
            model.chunked_loss_above = above
        proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
        made = [proc([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for q, a in (("what is two plus two?", "four"), ("name a colour.", "red, or green"))]
        batch, _ = collate_packed(made)
        out = model(batch.input_ids, None, batch.labels, position_ids=batch.position_ids, num_items_in_batch=7.0)
        assert (out.logits is None) == (above == 0)  # the chunked path never builds the logits
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    (plain, plain_grads), (chunk, chunk_grads) = results
    torch.testing.assert_close(chunk, plain, rtol=1e-6, atol=1e-7)
    assert chunk_grads.keys() == plain_grads.keys() and "llm.lm_head.weight" in plain_grads
    for name in plain_grads:
        torch.testing.assert_close(chunk_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)

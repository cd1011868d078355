"""Our DPO / IPO / length-normalised / SimPO losses and sequence log-probs vs TRL's own code.

TRL (a test-only dependency) builds the batch, runs its real `DPOTrainer.compute_loss` and its
`compute_ref_log_probs` on tiny random Qwen2 models; we score the same batch with
`sequence_logps` + `preference_loss`. SimPO is checked against `CPOTrainer.cpo_loss`
(TRL's SimPO lives in its CPO trainer). Run with `-s` to see the differences printed.
"""
from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni.align.losses import preference_loss, sequence_logps
from omni.tokenizer import build_wordlevel_tokenizer

WORDS = ["what", "is", "one", "two", "three", "four", "five", "six", "plus", "?", "[", "]", "ok", "done",
         "reply", "inside", "brackets", "say", "twice", "."]
# completions of different lengths, so the length-normalised variants are really exercised
PAIRS = [("one", "two", "[ three ]", "three"), ("two", "two", "[ four ]", "ok four done done"),
         ("one", "four", "[ five ]", "five five"), ("two", "three", "ok five", "[ five ] done")]


@pytest.fixture(scope="module")
def setup():
    tok = build_wordlevel_tokenizer(WORDS)

    def model(seed):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=128)).eval()
    rows = [{"prompt": [{"role": "system", "content": "reply inside brackets ."},
                        {"role": "user", "content": f"what is {a} plus {b} ?"}],
             "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}]}
            for a, b, c, r in PAIRS]
    return tok, model(0), model(1), Dataset.from_list(rows)


def _dpo_trainer(tmp_path, setup, loss_type, beta):
    tok, policy, ref, data = setup
    args = trl.DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], beta=beta, report_to=[], use_cpu=True,
                         bf16=False)  # TRL defaults to bf16 autocast
    return trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                          train_dataset=data, processing_class=tok)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm"])
def test_dpo_losses_equal_trl(tmp_path, setup, loss_type):
    _, policy, ref, _ = setup
    beta = 0.3
    trainer = _dpo_trainer(tmp_path, setup, loss_type, beta)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        trl_pc, trl_pr = trainer.compute_ref_log_probs(trainer.model, batch)   # TRL's log-prob code, policy
        trl_rc, trl_rr = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        lp, n = sequence_logps(policy(**kw).logits, labels)
        rp, _ = sequence_logps(ref(**kw).logits, labels)
    pc, pr = lp.chunk(2)
    rc, rr = rp.chunk(2)
    lc, lr = n.chunk(2)
    assert lc.tolist() != lr.tolist()  # unequal lengths: normalisation matters
    ours, _, _ = preference_loss(loss_type, beta, pc, pr, rc, rr, lc, lr)
    logp_diff = max(float((pc - trl_pc).abs().max()), float((rc - trl_rc).abs().max()),
                    float((pr - trl_pr).abs().max()), float((rr - trl_rr).abs().max()))
    # the same loss from TRL's own log-probs: pure loss-code parity
    ours_on_trl, _, _ = preference_loss(loss_type, beta, trl_pc, trl_pr, trl_rc, trl_rr, lc, lr)
    print(f"\n{loss_type}: TRL loss {float(trl_loss):.8f}, ours {float(ours.mean()):.8f}, "
          f"|diff| {abs(float(trl_loss - ours.mean())):.2e}; "
          f"on TRL's log-probs {abs(float(trl_loss - ours_on_trl.mean())):.2e}; "
          f"max |log-prob diff| {logp_diff:.2e}")
    assert abs(float(trl_loss - ours_on_trl.mean())) <= 1e-6
    assert abs(float(trl_loss - ours.mean())) <= 1e-6
    assert logp_diff <= 1e-5


def test_simpo_equals_trl_cpo_trainer(tmp_path, setup):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok, policy, _, _ = setup
    beta, gamma = 2.0, 0.7
    data = Dataset.from_list([{"prompt": "what is one plus two ?", "chosen": "[ three ]", "rejected": "three"}] * 2)
    args = CPOConfig(output_dir=str(tmp_path), loss_type="simpo", cpo_alpha=0.0, simpo_gamma=gamma, beta=beta,
                     report_to=[], use_cpu=True, bf16=False)
    trainer = CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=data, processing_class=tok)
    summed_c = torch.tensor([-12.8, -4.0, -22.0, -3.1])
    summed_r = torch.tensor([-4.0, -8.0, -11.2, -9.0])
    lc, lr = torch.tensor([4, 4, 4, 2]), torch.tensor([2, 2, 2, 3])
    trl_losses, trl_c, trl_r = trainer.cpo_loss(summed_c / lc, summed_r / lr)  # CPO takes average log-probs
    ours, c, r = preference_loss("simpo", beta, summed_c, summed_r, chosen_len=lc, rejected_len=lr, gamma=gamma)
    print(f"\nsimpo: max |loss diff| {float((trl_losses - ours).abs().max()):.2e}")
    assert torch.allclose(trl_losses, ours, atol=1e-6, rtol=0)
    assert torch.allclose(trl_c, c, atol=1e-6) and torch.allclose(trl_r, r, atol=1e-6)

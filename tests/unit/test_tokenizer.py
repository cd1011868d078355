"""Both tokenizer routes get the same special tokens, template and loss mask."""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from omni.modalities import PLACEHOLDERS
from omni.tokenizer import (
    IM_END,
    build_wordlevel_tokenizer,
    load_tokenizer,
    placeholder_ids,
)

CHAT = [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": "<image> hello"},
        {"role": "assistant", "content": "world"}]


def _mask(tok):
    enc = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return [t for t, m in zip(tok.convert_ids_to_tokens(enc["input_ids"]), enc["assistant_masks"]) if m]


def test_tiny_tokenizer_is_offline_and_masks_only_the_reply():
    tok = build_wordlevel_tokenizer(["hello", "world", "answer", "in", "one", "word"])
    assert _mask(tok) == ["world", IM_END]
    assert set(placeholder_ids(tok).values()).isdisjoint({tok.unk_token_id})


def test_a_pretrained_tokenizer_is_given_omni_tokens_and_template(tmp_path):
    """The 7B route (AutoTokenizer.from_pretrained + our tokens) on a tokenizer saved here."""
    vocab = {"<unk>": 0, "hello": 1, "world": 2, "</s>": 3, "answer": 4, "in": 5, "one": 6, "word": 7}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    ids = placeholder_ids(tok)
    assert all(tok.convert_ids_to_tokens(ids[m]) == p for m, p in PLACEHOLDERS.items())
    assert tok.eos_token == IM_END and tok.pad_token is not None
    assert _mask(tok) == ["world", IM_END]

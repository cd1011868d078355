"""Tokenizers: the modality placeholders, the chat template, and an offline tiny tokenizer.

Every tokenizer omni uses (a pretrained one for the 7B preset, the word-level one built
offline for the tiny preset) gets the same special tokens and the same ChatML template, so
prompts, label masks and placeholder expansion are identical at every size.
"""
from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from omni.config import ConfigError
from omni.modalities import PLACEHOLDERS

IM_START, IM_END, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"
ROLES = ("system", "user", "assistant")
TINY_TOKENIZER = "synth-wordlevel"  # preset value that selects the offline word-level tokenizer

# ChatML; `{% generation %}` marks what the model is trained to produce (assistant replies
# and their end token) so `return_assistant_tokens_mask` yields the loss mask.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ m['content'] + '<|im_end|>' }}"
    "{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_wordlevel_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over a closed vocabulary (no download)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    specials = [PAD, UNK, IM_START, IM_END, *PLACEHOLDERS.values()]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in sorted(set(words) | set(ROLES)):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, *PLACEHOLDERS.values()],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(spec: str):
    """`synth-wordlevel` (tiny, offline) or a Hugging Face name/dir (e.g. the 7B LLM's own)."""
    if spec == TINY_TOKENIZER:
        from omni.tiny_world import vocabulary

        return build_wordlevel_tokenizer(vocabulary())
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer {spec}: cannot load a transformers tokenizer from it "
                          f"({str(e).splitlines()[0].strip()}); name one in the model config's `tokenizer` "
                          "(a Baichuan 2 checkpoint converted by omni.export.baichuan2 has none)") from None
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Add omni's special tokens and chat template to a pretrained tokenizer."""
    missing = [t for t in (IM_START, IM_END, *PLACEHOLDERS.values()) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = PAD if PAD in tok.get_vocab() else tok.eos_token
    tok.eos_token = IM_END
    tok.chat_template = CHAT_TEMPLATE
    return tok


def placeholder_ids(tok) -> dict[str, int]:
    return {m: tok.convert_tokens_to_ids(p) for m, p in PLACEHOLDERS.items()}

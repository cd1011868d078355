"""Align data: record sources agree, label masks (all / last assistant turns, preference replies),
the record stream's determinism, and PAS prompt deduplication."""
from __future__ import annotations

import json

import pytest
import torch

from omni.align.pas import dedup_prompts
from omni.align.synth import AlignSynthConfig, build_tokenizer, write_align_corpus
from omni.data.loader import SkipCounter
from omni.data.records import (
    AlignDataError,
    last_span,
    preference_examples,
    preference_messages,
    read_records,
    sft_example,
)
from omni.data.stream import RecordStream
from omni.model.fusion import IGNORE
from omni.model.processor import OmniProcessor


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_align_corpus(AlignSynthConfig(out_dir=str(tmp_path_factory.mktemp("d")), sft_train=20,
                                               pref_train=12, val=6, pas_train=10), base_model=False)


@pytest.fixture(scope="module")
def processor():
    from omni.align.synth import TINY_TEXT_OVERRIDES
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    model, tok = OmniModel.from_config(build_preset("tiny", TINY_TEXT_OVERRIDES), tokenizer=build_tokenizer())
    return OmniProcessor.from_config(model.config, tok, model.token_ids)


def _strip(recs):
    return [{k: v for k, v in r.items() if not k.startswith("__")} for r in recs]


def test_jsonl_manifest_and_shards_give_the_same_records(corpus):
    jsonl = _strip(read_records(corpus / "pref_train.jsonl"))
    manifest = _strip(read_records(corpus / "manifest.yaml", split="train", datasets=["pref"]))
    shards = _strip(read_records(str(corpus / "shards/pref-train-000000.tar")))
    assert jsonl == manifest == shards and len(jsonl) == 12
    assert "sample pref-train-000000" in read_records(corpus / "manifest.yaml", datasets=["pref"])[0]["__where__"]
    with pytest.raises(AlignDataError, match="no such file"):
        read_records(corpus / "missing.jsonl")


def test_last_span_keeps_only_the_final_reply():
    labels = torch.tensor([IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, IGNORE])
    assert last_span(labels).tolist() == [IGNORE] * 5 + [7, 8, IGNORE]


def test_sft_labels_cover_all_or_last_assistant_turns(processor):
    tok = processor.tokenizer
    turn = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    rec = {"messages": [{"role": "system", "content": "reply inside brackets ."},
                        *turn("what is one plus one ?", "[ two ]"), *turn("what is two plus two ?", "[ four ]")]}
    every = sft_example(processor, rec, "all")
    last = sft_example(processor, rec, "last")
    said = lambda ex: tok.decode([t for t in ex.labels.tolist() if t != IGNORE])
    assert said(every) == "[ two ] <|im_end|> [ four ] <|im_end|>"
    assert said(last) == "[ four ] <|im_end|>"
    assert torch.equal(every.input_ids, last.input_ids)  # same sequence, the system message and history as context


def test_preference_reply_forms(processor):
    tok = processor.tokenizer
    base = {"prompt": [{"role": "system", "content": "reply inside brackets ."},
                       {"role": "user", "content": "what is one plus one ?"}]}
    msg = lambda text: {"role": "assistant", "content": text}
    forms = [{"chosen": "[ two ]", "rejected": "two"},
             {"chosen": msg("[ two ]"), "rejected": msg("two")},
             {"chosen": [msg("[ two ]")], "rejected": [msg("two")]}]
    for form in forms:
        chosen, rejected = preference_examples(processor, {**base, **form})
        assert tok.decode([t for t in chosen.labels.tolist() if t != IGNORE]) == "[ two ] <|im_end|>"
        assert tok.decode([t for t in rejected.labels.tolist() if t != IGNORE]) == "two <|im_end|>"
    prompt, _, _ = preference_messages({"prompt": "hi", "chosen": "a", "rejected": "b"})
    assert prompt == [{"role": "user", "content": "hi"}]
    with pytest.raises(AlignDataError, match="'rejected'"):
        preference_messages({"prompt": "hi", "chosen": "a", "__where__": "x"})


def _records(seed: int, rank: int = 0, world_size: int = 1) -> RecordStream:
    return RecordStream(list(range(7)), seed, lambda r: r, SkipCounter(), rank=rank, world_size=world_size)


def test_record_stream_is_deterministic_and_ranks_split_it():
    first = _records(seed=3).take(14)
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:]) == list(range(7))  # epochs are permutations
    assert first[:7] != first[7:]  # reshuffled per epoch
    assert first == _records(seed=3).take(14)
    ranks = [_records(3, rank=r, world_size=2).take(7) for r in (0, 1)]
    assert ranks[0] == first[0::2] and ranks[1] == first[1::2]
    stopped = _records(seed=3)
    stopped.take(5)
    resumed = _records(seed=3)
    resumed.restore([stopped.state()])
    assert resumed.take(9) == first[5:] and resumed.consumed == 14
    with pytest.raises(AlignDataError, match="no training records"):
        RecordStream([], 0, lambda r: r, SkipCounter())


def test_prompt_dedup_exact_and_near():
    long = "please write a short poem about the sea at night with the moon and the stars and a small boat"
    prompts = [long, long.upper() + "  ", long.replace("small boat", "small red boat"), "what is two plus two ?"]
    kept, dropped = dedup_prompts(prompts, threshold=0.7)
    assert kept == [long, "what is two plus two ?"]
    assert [d for d, _ in dropped] == prompts[1:3] and all(orig == long for _, orig in dropped)
    kept, _ = dedup_prompts(prompts, threshold=1.0)  # exact only
    assert len(kept) == 3


def test_synth_files_are_in_the_benchmark_layouts(corpus):
    from omni.align.bench import load_cfbench, load_sysbench

    cases = load_sysbench(corpus / "sysbench.json")
    assert len(cases) == 8 and all(len(c.users) == 3 and c.keyed for c in cases)
    assert len(load_cfbench(corpus / "cfbench.json")) == 8
    assert json.loads((corpus / "sft_val.jsonl").read_text().splitlines()[0])["messages"]


def test_every_align_config_loads_and_tiny_and_7b_twins_share_keys():
    from pathlib import Path

    import yaml

    from omni.config import ConfigError
    from omni.train.config import load_stage

    def keys(d, prefix=""):
        return {k for key, v in d.items()
                for k in (keys(v, f"{prefix}{key}.") if isinstance(v, dict) else {f"{prefix}{key}"})}
    folder = Path(__file__).resolve().parents[2] / "omni/align/configs"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) == 8
    for f in files:
        load_stage(f)
    for f in folder.glob("tiny_*.yaml"):
        twin = f.with_name(f.name.replace("tiny_", "7b_"))
        assert keys(yaml.safe_load(f.read_text())) == keys(yaml.safe_load(twin.read_text())), f.name
    with pytest.raises(ConfigError, match="unknown key"):
        load_stage(files[0], ["dpo.betta=0.1"])
    with pytest.raises(ConfigError, match="loss_type"):
        load_stage(folder / "tiny_dpo.yaml", ["dpo.loss_type=kto"])

"""PAS end to end: prompts -> dedup -> classify -> complements from an OpenAI-compatible stub on
127.0.0.1 (some bad at first, regenerated after the judge says no) -> pairs -> a tiny PAS model
trained on them -> `augment` adds the right complement to held-out prompts."""
from __future__ import annotations

import json
import re

import yaml

from omni.align.generate import LocalGenerator
from omni.align.pas import GENERATE_INSTRUCTIONS, JUDGE_INSTRUCTIONS, PromptAugmenter
from omni.align.synth import PAS_KINDS, AlignSynthConfig, write_align_corpus
from omni.cli.main import main as cli_main
from omni.demo.engine import DemoEngine
from tests.integration.test_align_pipeline import CONFIGS, omni_align
from tests.unit.test_align_judge import StubChat

GOOD = {"arith": PAS_KINDS["arith"][1], "colour": PAS_KINDS["colour"][1]}


def _same(a: str, b: str) -> bool:
    """Equal up to the spaces the word-level tokenizer's decoder drops before punctuation."""
    return a.replace(" ", "") == b.replace(" ", "")


def _writer_and_judge(seen: set):
    """The stub's behaviour: writes complements, judges them."""
    def reply(messages):
        return _reply(messages, seen)
    return reply


def _reply(messages, seen: set) -> str:
    text = messages[-1]["content"]
    if text.startswith(JUDGE_INSTRUCTIONS):
        comp = text.split("Complementary instruction:\n", 1)[1]
        return "yes" if comp.startswith("answer with") else "no"
    assert text.startswith(GENERATE_INSTRUCTIONS)
    prompt = re.findall(r"Prompt:\n(.*?)\nComplement:", text, re.DOTALL)[-1]
    if "blue" in prompt:
        return ""                                  # never usable: rejected every round
    if "zero" in prompt and prompt not in seen:
        seen.add(prompt)                           # the first draft for a "zero" prompt answers it instead
        return "three"
    return GOOD["colour"] if "colour" in prompt else GOOD["arith"]


def test_pas_data_model_and_augment(tmp_path, capsys):
    out = write_align_corpus(AlignSynthConfig(out_dir=str(tmp_path / "synth"), sft_train=8, pref_train=8, val=20,
                                              pas_train=200), base_model=True)
    (tmp_path / "kw.yaml").write_text(yaml.safe_dump({"arith": ["plus", "add"], "colour": ["colour"]}))
    stub = StubChat(_writer_and_judge(set()))
    try:
        omni_align("pas", "build", "--prompts", str(out / "pas_prompts.jsonl"), "--generator", stub.url,
                   "--judge", stub.url, "--classifier", f"keywords:{tmp_path / 'kw.yaml'}", "--per-category", "12",
                   "--out", str(tmp_path / "pas"))
    finally:
        stub.close()
    report = json.loads((tmp_path / "pas/pas_report.json").read_text())
    unique = len({json.loads(line)["prompt"] for line in (out / "pas_prompts.jsonl").read_text().splitlines()})
    assert report["collected"] == 220 and report["after_dedup"] == unique and report["duplicates"] == 220 - unique
    assert report["categories"] == {"arith": 12, "colour": 12}                   # balanced by --per-category
    assert report["round_0"]["accepted"] < report["round_0"]["generated"]      # judge refused the answers
    assert report["round_1"]["accepted"] > 0                                    # ... and regeneration fixed them
    rejected = [json.loads(line) for line in (tmp_path / "pas/pas_rejected.jsonl").read_text().splitlines()]
    assert rejected and all("blue" in r["prompt"] and r["reason"] == "empty" for r in rejected)
    pairs = [json.loads(line) for line in (tmp_path / "pas/pas_pairs.jsonl").read_text().splitlines()]
    assert all(p["messages"][1]["content"] == GOOD[p["category"]] for p in pairs)

    omni_align("pas", "train", f"{CONFIGS}/tiny_pas.yaml", "--out", str(tmp_path / "pas-model"),
               f"init_from={out}/base", f"data.records={tmp_path}/pas/pas_pairs.jsonl", f"data.eval={out}/pas_val.jsonl",
               "steps=50")
    val = [json.loads(line) for line in (out / "pas_val.jsonl").read_text().splitlines()]
    prompts = [r["messages"][0]["content"] for r in val]
    rates = {}
    for name, path in (("base", out / "base"), ("pas", tmp_path / "pas-model/final")):
        augmented = PromptAugmenter(LocalGenerator.load(path, batch_size=32), max_new_tokens=8).augment_many(prompts)
        right = [_same(a, f"{p}\n{GOOD[r['category']]}") for a, p, r in zip(augmented, prompts, val)]
        rates[name] = sum(right) / len(val)
        print(name, augmented[:2])
    print(f"\nPAS complement right on held-out prompts: untrained {rates['base']:.2f}, trained {rates['pas']:.2f}")
    assert rates["pas"] >= 0.8 and rates["base"] <= 0.2
    omni_align("pas", "augment", str(tmp_path / "pas-model/final"), "--prompt", "what is one plus four ?")

    # PAS behind a switch in front of any model: `omni chat --pas` and the demo's engine
    held_out = next(r for r in val if _same(PromptAugmenter.load(str(tmp_path / "pas-model/final")).augment(
        r["messages"][0]["content"]), f"{r['messages'][0]['content']}\n{GOOD[r['category']]}"))
    prompt, complement = held_out["messages"][0]["content"], GOOD[held_out["category"]]
    capsys.readouterr()
    cli_main(["chat", str(out / "base"), "--pas", str(tmp_path / "pas-model/final"), "--prompt", prompt,
              "--max-new-tokens", "4"])
    assert _same(capsys.readouterr().out.splitlines()[0], f"pas> {complement}")
    engine = DemoEngine(out / "base", pas=str(tmp_path / "pas-model/final"))
    model_text, shown = engine.augment(prompt)
    assert _same(shown, complement) and _same(model_text, f"{prompt}\n{complement}")
    assert DemoEngine(out / "base").augment(prompt) == (prompt, "")  # switched off: untouched

"""Benchmark runs against an OpenAI-compatible stub on 127.0.0.1 as the model under test: the SysBench
history modes, judges and undecided policies, and official-layout outputs; a local transformers
model as a generator."""
from __future__ import annotations

import json

import pytest

from omni.align.bench import (
    BenchmarkDataError,
    load_sysbench,
    run_cfbench,
    run_sysbench,
)
from omni.align.generate import LocalGenerator, OpenAIGenerator
from omni.align.judge import ChainJudge, ModelJudge, RuleJudge, UndecidedError
from tests.unit.test_align_judge import StubChat


def _sysbench_file(tmp_path):
    data = [{"system_id": 7, "system_prompt": "S", "领域": "d", "场景": "s", "rounds_related": True,
             "messages": [{"role": "system", "content": "S"},
                          {"role": "user", "content": "q1"}, {"role": "assistant", "content": "gt1"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "gt2"},
                          {"role": "user", "content": "q3"}, {"role": "assistant", "content": "gt3"}],
             "prompt_infos": {q: {"alignment": "align", "criteria": {
                 "1": {"criteria_id": 1, "criteria_content": 'the reply starts with "re"', "criteria_type": "格式约束"},
                 "2": {"criteria_id": 2, "criteria_content": "the reply is polite", "criteria_type": "风格约束"}}}
                 for q in ("q1", "q2", "q3")}}]
    path = tmp_path / "sys.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def _model_and_judge(messages):
    last = messages[-1]["content"]
    if "[Checklist]" in last:  # judge: only the politeness item reaches it; q3's reply is rude
        return "1: no" if "rude" in last.split("[Assistant reply to grade]")[1] else "1: yes"
    history = " | ".join(m["content"] for m in messages if m["role"] == "assistant")
    return ("rude " if last == "q3" else "re ") + f"{last} after [{history}]"


@pytest.mark.parametrize("history", ["gt", "model"])
def test_sysbench_history_modes_judges_and_layout(tmp_path, history):
    stub = StubChat(_model_and_judge)
    try:
        gen = OpenAIGenerator(stub.url, model="m")
        judge = ChainJudge([RuleJudge(), ModelJudge(OpenAIGenerator(stub.url, model="j"))])
        m = run_sysbench(_sysbench_file(tmp_path), tmp_path / "out", gen, judge, history=history, model_name="m")
    finally:
        stub.close()
    rec = json.loads((tmp_path / "out/sysbench_eval.json").read_text())[0]
    replies = [rec["eval_results"][q]["response"] for q in ("q1", "q2", "q3")]
    if history == "gt":   # every turn sees the ground-truth earlier replies
        assert replies[2] == "rude q3 after [gt1 | gt2]"
        assert len(rec["infer_results"]) == 3 and rec["infer_results"][2][-1]["content"] == replies[2]
    else:                 # every turn sees the model's own earlier replies
        assert replies[1] == "re q2 after [re q1 after []]"
        assert rec["infer_results"][-1]["content"] == replies[2]
    assert rec["eval_results"]["q1"]["评判结果"] == {"1": "是", "2": "是"}
    assert rec["eval_results"]["q3"]["评判结果"] == {"1": "否", "2": "否"}
    o = m["overall"]
    assert (o["CSR"], o["ISR"], o["SSR"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (tmp_path / "out/sysbench.md").is_file()


def test_undecided_policies_and_data_errors(tmp_path):
    stub = StubChat(lambda messages: "re ok")
    try:
        gen = OpenAIGenerator(stub.url)
        with pytest.raises(UndecidedError, match="system_id 7 turn 1"):
            run_sysbench(_sysbench_file(tmp_path), tmp_path / "a", gen, RuleJudge())
        m = run_sysbench(_sysbench_file(tmp_path), tmp_path / "b", gen, RuleJudge(), undecided="fail")
        assert m["overall"]["CSR"] == 0.5 and m["overall"]["ISR"] == 0
        m = run_sysbench(_sysbench_file(tmp_path), tmp_path / "c", gen, RuleJudge(), undecided="skip")
        assert m["overall"]["ISR"] == 1 and m["overall"]["constraints"] == 3
        items = [{"idx": 0, "prompt": "p", "split": "easy", "gold": "",
                  "criteria": [['the reply starts with "re"', "主需", "格式约束", "x"], ["is kind", "次需", "风格约束", "y"]]}]
        (tmp_path / "cf.json").write_text(json.dumps(items, ensure_ascii=False))
        m = run_cfbench(tmp_path / "cf.json", tmp_path / "d", gen, RuleJudge(), undecided="skip")
        rec = json.loads((tmp_path / "d/cfbench_eval.json").read_text())[0]
        assert rec["judge_score"] == ["1"] and rec["criteria_skipped"][0][0] == "is kind"
        assert m["full"] == {"CSR": 1.0, "ISR": 1.0, "PSR": 1.0, "n": 1}
    finally:
        stub.close()
    bad = json.loads(_sysbench_file(tmp_path).read_text())
    bad[0]["messages"].insert(2, {"role": "user", "content": "again"})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(BenchmarkDataError, match="alternate"):
        load_sysbench(tmp_path / "bad.json")


def test_local_transformers_model_as_a_generator(tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omni.tokenizer import build_wordlevel_tokenizer

    tok = build_wordlevel_tokenizer(["hello", "world"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    gen = LocalGenerator.load(tmp_path / "hf", batch_size=2)
    out = gen.chat([[{"role": "user", "content": "hello"}], [{"role": "user", "content": "hello world"}] * 3],
                   max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    # a prompt longer than the context keeps its end instead of failing
    assert len(gen.chat([[{"role": "user", "content": "hello " * 100}]], max_new_tokens=4)) == 1


def test_pas_model_classifier_over_an_endpoint():
    from omni.align.pas import ModelClassifier

    stub = StubChat(lambda m: "Category: coding" if "python" in m[-1]["content"] else "I am not sure")
    try:
        cats = ModelClassifier(OpenAIGenerator(stub.url), {"coding": "code", "writing": "prose", "other": "else"})
        assert cats.classify(["fix my python loop", "hello"]) == ["coding", "other"]
        assert "Categories:\n- coding: code" in stub.requests[0]["messages"][0]["content"]
    finally:
        stub.close()

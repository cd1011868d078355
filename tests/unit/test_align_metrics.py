"""SysBench / CFBench metric arithmetic on hand-made judged results; expected values by hand."""
from __future__ import annotations

import json

import pytest

from omni.align.bench import (
    parse_cfbench_judged,
    parse_sysbench_judged,
    score_cfbench_judged,
    score_sysbench_judged,
)
from omni.align.metrics import (
    CFItem,
    MetricError,
    SysDialogue,
    SysTurn,
    cfbench_metrics,
    sysbench_metrics,
)

# ---------------------------------------------------------------- SysBench
# dialogue A (dependent, edu): turn1 [1,1] align, turn2 [1,0,1] misalign, turn3 [1] align
# dialogue B (parallel, law):  turn1 [1,1,1] align, turn2 [1] align, turn3 [0,1] misalign
A = [([1, 1], ["动作约束", "格式约束"], "align"),
     ([1, 0, 1], ["内容约束", "格式约束", "风格约束"], "misalign"),
     ([1], ["角色约束"], "align")]
B = [([1, 1, 1], ["背景约束", "格式约束", "格式约束"], "align"),
     ([1], ["动作约束"], "align"),
     ([0, 1], ["内容约束", "角色约束"], "misalign")]


def _dialogues():
    def turns(spec, tag):
        return [SysTurn(f"{tag} question {i}", ["是" if s else "否" for s in sat], types, al)
                for i, (sat, types, al) in enumerate(spec)]
    return [SysDialogue("A", turns(A, "A"), True, "edu"), SysDialogue("B", turns(B, "B"), False, "law")]


def _check_sysbench(m):
    o = m["overall"]
    assert o["CSR"] == pytest.approx(10 / 12)                # constraint level: 10 of 12 met (the published CSR)
    assert o["CSR_per_instruction"] == pytest.approx(31 / 36)  # (1 + 2/3 + 1 + 1 + 1 + 1/2) / 6
    assert o["ISR"] == pytest.approx(4 / 6)                  # instructions with every constraint met
    assert o["SSR"] == pytest.approx((1 / 3 + 2 / 3) / 2)    # A: 1 of 3 turns before the first miss, B: 2 of 3
    assert (o["dialogues"], o["instructions"], o["constraints"]) == (2, 6, 12)
    # with 是/否 only, the analysis sheets' stricter all-是 rule agrees with the usable one
    assert m["by_turn"]["1"] == {"ISR": 1.0, "continuous": 1.0, "all_yes": 1.0, "all_yes_continuous": 1.0, "n": 2}
    assert m["by_turn"]["2"] == {"ISR": 0.5, "continuous": 0.5, "all_yes": 0.5, "all_yes_continuous": 0.5, "n": 2}
    assert m["by_turn"]["3"] == {"ISR": 0.5, "continuous": 0.0, "all_yes": 0.5, "all_yes_continuous": 0.0, "n": 2}
    assert m["by_alignment"]["align"] == {"CSR": 1.0, "ISR": 1.0, "instructions": 4}
    assert m["by_alignment"]["misalign"]["CSR"] == pytest.approx(3 / 5)
    assert m["by_alignment"]["misalign"]["ISR"] == 0.0
    assert m["verdicts"] == {"是": 10, "否": 2}
    rates = {k: (v["satisfied"], v["total"]) for k, v in m["by_constraint_type"].items()}
    assert rates == {"格式约束": (3, 4), "内容约束": (1, 2), "动作约束": (2, 2), "风格约束": (1, 1),
                     "角色约束": (2, 2), "背景约束": (1, 1)}
    assert m["by_constraint_type"]["格式约束"]["name"] == "format"
    dep, par = m["by_dependency"]["dependent"], m["by_dependency"]["parallel"]
    assert (dep["CSR"], dep["ISR"], dep["SSR"]) == pytest.approx((5 / 6, 2 / 3, 1 / 3))
    assert (par["CSR"], par["ISR"], par["SSR"]) == pytest.approx((5 / 6, 2 / 3, 2 / 3))
    assert set(m["by_domain"]) == {"edu", "law"}


def test_sysbench_metrics_by_hand():
    _check_sysbench(sysbench_metrics(_dialogues()))


def _official_sysbench_records():
    """The same judgments in the official eval layout: eval_results keyed by user content, 是/否."""
    records = []
    for sid, spec, related, domain in (("A", A, True, "edu"), ("B", B, False, "law")):
        messages = [{"role": "system", "content": f"system {sid}"}]
        infos, results = {}, {}
        for i, (sat, types, al) in enumerate(spec):
            q = f"{sid} question {i}"
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": f"gt {i}"}]
            crit = {str(k + 1): {"criteria_id": k + 1, "criteria_content": f"c{k}", "criteria_type": t}
                    for k, t in enumerate(types)}
            infos[q] = {"alignment": al, "criteria": crit}
            results[q] = {"评判理由": "...", "评判结果": {str(k + 1): "是" if s else "否" for k, s in enumerate(sat)},
                          "criteria": crit, "response": "r"}
        records.append({"system_id": sid, "system_prompt": f"system {sid}", "messages": messages,
                        "prompt_infos": infos, "rounds_related": related, "领域": domain, "场景": "x",
                        "eval_results": results})
    return records


def test_sysbench_judged_file_in_the_official_layout(tmp_path):
    path = tmp_path / "model_eval.json"
    path.write_text(json.dumps(_official_sysbench_records(), ensure_ascii=False))
    m = score_sysbench_judged(path, tmp_path / "out")
    _check_sysbench(m)
    assert json.loads((tmp_path / "out/sysbench_metrics.json").read_text())["overall"]["CSR"] == pytest.approx(10 / 12)
    md = (tmp_path / "out/sysbench.md").read_text()
    assert "| CSR | ISR | SSR |" in md and "0.8611" in md


def test_sysbench_judged_refuses_a_failed_dialogue():
    records = _official_sysbench_records()
    records[1]["eval_results"] = None
    with pytest.raises(ValueError, match="system_id B"):
        parse_sysbench_judged(records)


# ---------------------------------------------------------------- CFBench
def _crit(prios):
    return [[f"requirement {i}", {"P": "主需", "S": "次需", "p": "primary", "s": "secondary"}[p],
             "数值约束" if i % 2 else "内容约束", "sub"] for i, p in enumerate(prios)]


CF = [  # idx, split, priorities, scores, parsing; per-item (CSR, ISR, PSR) computed by hand
    (0, "easy", "PSS", [1, 1, 0], "1"),          # 2/3, 0, secondary mean .5 -> .75 not > .8 -> 0
    (1, "easy", "PP", [1, 1], "1"),              # 1, 1, only primaries met -> 1
    (2, "hard", "SSSSS", [1, 1, 1, 1, 0], "1"),  # .8, 0, only secondaries: .8 not > .8 -> 0
    (3, "hard", "psss", [1, 1, 1, 0], "1"),      # .75, 0, primaries met, .5 + .5*(2/3) = .833 > .8 -> 1
    (4, "hard", "PS", [0, 1], "1"),              # .5, 0, a primary missed -> 0
    (5, "hard", "PSS", [0], "-1"),               # judge output unparsable: 0, 0, 0
    (6, "easy", "PSSSSS", [1, 1, 1, 1, 1], "0"),  # partial parse: 1, 1, csr > .8 -> 1
]


def _cf_items():
    return [CFItem(i, split, _crit(p), s, parsing, domain=f"d{i % 2}", scenario="s")
            for i, split, p, s, parsing in CF]


def _check_cfbench(m):
    easy, hard, full = m["easy"], m["hard"], m["full"]
    assert easy["CSR"] == pytest.approx((2 / 3 + 1 + 1) / 3) and easy["n"] == 3
    assert easy["ISR"] == pytest.approx(2 / 3) and easy["PSR"] == pytest.approx(2 / 3)
    assert hard["CSR"] == pytest.approx((0.8 + 0.75 + 0.5 + 0) / 4) and hard["n"] == 4
    assert hard["ISR"] == 0 and hard["PSR"] == pytest.approx(1 / 4)
    assert full["CSR"] == pytest.approx((2 / 3 + 1 + 1 + 0.8 + 0.75 + 0.5 + 0) / 7)
    assert full["ISR"] == pytest.approx(2 / 7) and full["PSR"] == pytest.approx(3 / 7)
    # per-criterion breakdowns use the items whose scores line up with their criteria (parsing "1")
    assert m["aligned_items"] == 5
    assert m["by_priority"]["primary"] == {"satisfied": 4, "total": 5, "rate": 0.8}
    assert m["by_priority"]["secondary"]["satisfied"] == 8 and m["by_priority"]["secondary"]["total"] == 11
    assert [r["PSR"] for r in m["items"]] == [0, 1, 0, 1, 0, 0, 1]


def test_cfbench_metrics_by_hand():
    _check_cfbench(cfbench_metrics(_cf_items()))


def test_cfbench_official_rounding():
    m = cfbench_metrics(_cf_items(), official_rounding=True)
    assert m["items"][0]["CSR"] == 0.67                       # per-item CSR rounded first
    assert m["easy"]["CSR"] == round((0.67 + 1 + 1) / 3, 2) == 0.89
    assert m["full"]["CSR"] == round((0.67 + 1 + 1 + 0.8 + 0.75 + 0.5 + 0) / 7, 2) == 0.67
    assert m["full"]["PSR"] == 0.43 and m["hard"]["PSR"] == 0.25


def test_cfbench_judged_file_in_the_official_layout(tmp_path):
    records = [{"idx": i, "prompt": "p", "gold": "", "doamin": f"d{i % 2}", "scenario": "s", "split": split,
                "criteria": _crit(p), "response": "r", "judge_response": "...",
                "judge_score": [str(s) for s in scores], "judge_parsing": parsing}
               for i, split, p, scores, parsing in CF]
    path = tmp_path / "m_eval.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    _check_cfbench(score_cfbench_judged(path, tmp_path / "out"))
    assert "| full |" in (tmp_path / "out/cfbench.md").read_text()
    # without judge_parsing, a score list as long as the criteria counts as fully parsed
    for r in records:
        r.pop("judge_parsing")
    assert [it.parsing for it in parse_cfbench_judged(records)] == ["1", "1", "1", "1", "1", "0", "0"]


def test_cfbench_rejects_unknown_priority_and_split():
    bad = CFItem(0, "easy", [["t", "must", "x", "y"]], [1])
    with pytest.raises(MetricError, match="priority 'must'"):
        cfbench_metrics([bad])
    with pytest.raises(MetricError, match="split"):
        cfbench_metrics([CFItem(0, "medium", _crit("P"), [1])])

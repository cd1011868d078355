"""SysBench as published: the official judge's verdicts besides 是/否, the published *_analysis.xlsx
layout (sheet 详情 plus the analysis code's summary sheets) and the eval script's JSON give the same
figures, which reproduce the workbook's own summary sheets; wrong inputs are refused in one line.

The workbook is written the way the official analysis writes it (pandas' ExcelWriter, same sheets,
columns and row order); its summary sheets hold the figures the official rules give, worked out by
hand below. The rules (SysBench's utils.py and plot/ code): a constraint counts toward CSR only when
judged 是; an instruction is usable (是否可用, the ISR and SSR) unless a verdict is 否; the sheets
不同轮次遵循 and 最大连续遵循轮次 count a turn only when every verdict is 是."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from openpyxl import load_workbook

from omni.align.bench import (
    BenchmarkDataError,
    load_sysbench,
    read_sysbench_workbook,
    score_cfbench_judged,
    score_sysbench_judged,
)
from omni.align.metrics import sysbench_metrics
from tests.helpers import cli_error

# (criteria_type, verdict) per constraint, alignment; two dialogues of five turns
D1 = [([("动作约束", "是"), ("格式约束", "是")], "align"),
      ([("内容约束", "是"), ("格式约束", "不适用")], "misalign"),   # usable, not all 是
      ([("内容约束", "否"), ("风格约束", "是")], "align"),          # not usable
      ([("角色约束", "是")], "align"),
      ([("背景约束", "无法判断")], "align")]                        # usable, not all 是
D2 = [([("动作约束", "是")], "misalign"),
      ([("格式约束", "是"), ("风格约束", "是")], "align"),
      ([("内容约束", "部分"), ("格式约束", "是")], "align"),         # usable, not all 是
      ([("内容约束", "是")], "align"),
      ([("格式约束", "否")], "misalign")]
DIALOGUES = [(1, D1, True, "教育"), (2, D2, False, "法律")]

# by hand: 15 constraints, 10 judged 是; usable turns D1 [1,1,0,1,1], D2 [1,1,1,1,0]; all 是 D1 [1,0,0,1,0],
# D2 [1,1,0,1,0]; usable streaks 2 and 4, all-是 streaks 1 and 2
TYPES = {"动作约束": (2, 2), "内容约束": (4, 2), "背景约束": (1, 0), "角色约束": (1, 1), "格式约束": (5, 3),
         "风格约束": (2, 2)}                                          # type: (constraints, judged 是)
CSR, ISR, SSR = 10 / 15, 8 / 10, (2 / 5 + 4 / 5) / 2
ROUNDS_ALL_YES = [2, 1, 0, 2, 0]                                       # sheet 不同轮次遵循
CONTINUOUS_ALL_YES = {"dependent": [1, 0, 0, 0, 0], "parallel": [1, 1, 0, 0, 0], "all": [2, 1, 0, 0, 0]}
USABLE_BY_ALIGNMENT = {"dependent": {"align": (4, 3), "misalign": (1, 1)},  # (instructions, usable)
                       "parallel": {"align": (3, 3), "misalign": (2, 1)}}


def _pct(x: float) -> float:
    return round(x * 100, 2)  # how the official sheets print a rate


def _detail_rows() -> list[dict]:
    rows = []
    for sid, turns, related, domain in DIALOGUES:
        for t, (checks, alignment) in enumerate(turns, 1):
            verdicts = [v for _, v in checks]
            rows.append({"system_id": sid, "领域": domain, "场景": "咨询", "multi_rounds_related": related,
                         "alignment": alignment, "round_index": t, "system_prompt": f"system {sid}",
                         "prompt": f"{sid} question {t}", "referrence": f"gt {t}", "answer": f"answer {t}",
                         "infer_model": "m",
                         "评判细则": "\n".join(f"{k}. criterion {k} | {c}" for k, (c, _) in enumerate(checks, 1)),
                         "评判理由": "...",
                         "评判结果": "\n".join(f"{k}. {c} | {v}" for k, (c, v) in enumerate(checks, 1)),
                         "是否可用": 1 if "否" not in verdicts else 0})
    return rows


def _write_workbook(path, rows=None):
    """The official analysis' workbook: 详情 and its summary sheets, holding the figures by hand."""
    kinds = list(TYPES)
    types = pd.DataFrame([{**{k: TYPES[k][0] for k in kinds}, "total": 15},
                          {**{k: TYPES[k][1] for k in kinds}, "total": 10},
                          {**{k: _pct(TYPES[k][1] / TYPES[k][0]) for k in kinds}, "total": _pct(CSR)}],
                         index=["约束总量", "遵循数量", "遵循率"])
    rounds = pd.DataFrame([{**dict(enumerate(ROUNDS_ALL_YES, 1)), "total": 5},
                           {**{t: _pct(n / 2) for t, n in enumerate(ROUNDS_ALL_YES, 1)}, "total": _pct(5 / 10)}],
                          index=["当前轮次遵循数量", "遵循率"])
    continuous = pd.concat([pd.DataFrame([dict(enumerate(CONTINUOUS_ALL_YES[g], 1)),
                                          {t: _pct(n / size) for t, n in enumerate(CONTINUOUS_ALL_YES[g], 1)}])
                            for g, size in (("dependent", 1), ("parallel", 1), ("all", 2))], axis=1)
    usable = []
    for g in ("dependent", "parallel"):
        counts = {a: USABLE_BY_ALIGNMENT[g][a] for a in ("align", "misalign")}
        total = (sum(n for n, _ in counts.values()), sum(u for _, u in counts.values()))
        usable.append(pd.DataFrame([{**{a: n for a, (n, _) in counts.items()}, "total": total[0]},
                                    {**{a: u for a, (_, u) in counts.items()}, "total": total[1]},
                                    {**{a: _pct(u / n) for a, (n, u) in counts.items()}, "total": _pct(total[1] / total[0])}]))
    usable.append(pd.DataFrame([{"align": 7, "misalign": 3, "total": 10}, {"align": 6, "misalign": 2, "total": 8},
                                {"align": _pct(6 / 7), "misalign": _pct(2 / 3), "total": _pct(ISR)}]))
    with pd.ExcelWriter(path) as writer:
        pd.DataFrame(rows or _detail_rows()).to_excel(writer, sheet_name="详情", index=False)
        types.to_excel(writer, sheet_name="不同约束类型遵循")
        rounds.to_excel(writer, sheet_name="不同轮次遵循")
        continuous.to_excel(writer, sheet_name="最大连续遵循轮次")
        pd.concat(usable, axis=1).to_excel(writer, sheet_name="统计多轮相关|平行-prompt对齐|冲突的可用率结果")
    return path


def _eval_json(path):
    """The same judgments as the official eval script writes them (<model>_eval.json)."""
    records = []
    for sid, turns, related, domain in DIALOGUES:
        messages, infos, results = [{"role": "system", "content": f"system {sid}"}], {}, {}
        for t, (checks, alignment) in enumerate(turns, 1):
            q = f"{sid} question {t}"
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": f"gt {t}"}]
            crit = {str(k): {"criteria_id": k, "criteria_content": f"criterion {k}", "criteria_type": c}
                    for k, (c, _) in enumerate(checks, 1)}
            infos[q] = {"alignment": alignment, "criteria": crit}
            results[q] = {"评判理由": "...", "评判结果": {str(k): v for k, (_, v) in enumerate(checks, 1)},
                          "criteria": crit, "response": f"answer {t}"}
        records.append({"system_id": sid, "system_prompt": f"system {sid}", "messages": messages,
                        "prompt_infos": infos, "rounds_related": related, "领域": domain, "场景": "咨询",
                        "infer_model": "m", "eval_results": results})
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def _sheets(path) -> dict[str, list[list]]:
    book = load_workbook(path, read_only=True)
    return {name: [list(r) for r in book[name].iter_rows(values_only=True)] for name in book.sheetnames[1:]}


@pytest.fixture
def book(tmp_path):
    return _write_workbook(tmp_path / "m_analysis.xlsx")


def test_other_verdicts_count_as_the_official_code_counts_them(book):
    m = sysbench_metrics(read_sysbench_workbook(book))
    o = m["overall"]
    assert (o["CSR"], o["ISR"], o["SSR"]) == pytest.approx((CSR, ISR, SSR))
    assert o["CSR_per_instruction"] == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 + 0 + 1 + 1 + 1 / 2 + 1 + 0) / 10)
    assert m["verdicts"] == {"是": 10, "否": 2, "不适用": 1, "无法判断": 1, "部分": 1}
    assert {k: (r["total"], r["satisfied"]) for k, r in m["by_constraint_type"].items()} == TYPES
    assert [m["by_turn"][str(t)]["continuous"] for t in range(1, 6)] == [1, 1, 0.5, 0.5, 0]  # usable streaks 2, 4
    assert [m["by_turn"][str(t)]["all_yes"] * 2 for t in range(1, 6)] == ROUNDS_ALL_YES


def test_the_workbook_and_the_eval_json_reproduce_the_workbooks_own_summary_sheets(book, tmp_path):
    from_book = score_sysbench_judged(book, tmp_path / "book")
    from_json = score_sysbench_judged(_eval_json(tmp_path / "m_eval.json"), tmp_path / "json")
    assert {k: v for k, v in from_book.items() if k != "setup"} == {k: v for k, v in from_json.items() if k != "setup"}
    sheets = _sheets(book)
    kinds = sheets["不同约束类型遵循"]
    for j, kind in enumerate(kinds[0][1:], 1):
        got = from_book["overall"] if kind == "total" else from_book["by_constraint_type"][kind]
        total = got["constraints"] if kind == "total" else got["total"]
        rate = got["CSR"] if kind == "total" else got["rate"]
        assert [kinds[1][j], kinds[2][j], kinds[3][j]] == [total, round(rate * total), _pct(rate)], kind
    assert sheets["不同轮次遵循"][1][1:6] == [round(from_book["by_turn"][str(t)]["all_yes"] * 2) for t in range(1, 6)]
    continuous = sheets["最大连续遵循轮次"][1][1:]
    groups = [from_book["by_dependency"]["dependent"], from_book["by_dependency"]["parallel"], from_book]
    sizes = [1, 1, 2]
    assert continuous == [round(g["by_turn"][str(t)]["all_yes_continuous"] * n)
                          for g, n in zip(groups, sizes) for t in range(1, 6)]
    usable = sheets["统计多轮相关|平行-prompt对齐|冲突的可用率结果"]
    assert usable[3][9] == _pct(from_book["overall"]["ISR"])  # the published ISR
    for g, group in enumerate(groups):
        for k, alignment in enumerate(("align", "misalign")):
            r = group["by_alignment"][alignment]
            assert [usable[1][1 + 3 * g + k], usable[3][1 + 3 * g + k]] == [r["instructions"], _pct(r["ISR"])]
    md = (tmp_path / "book/sysbench.md").read_text()
    assert "Verdicts: 是 10, 否 2, 不适用 1, 无法判断 1, 部分 1" in md


def test_an_unknown_verdict_names_the_row_or_dialogue_and_the_word(tmp_path):
    rows = _detail_rows()
    rows[3]["评判结果"] = "1. 角色约束 | 可能"
    with pytest.raises(BenchmarkDataError, match=r"sheet 详情 row 5 \(system_id 1\) criterion 1: verdict '可能' is "
                                                 r"none of the official judge's \(是, 否, 不适用"):
        read_sysbench_workbook(_write_workbook(tmp_path / "bad.xlsx", rows))
    records = json.loads(_eval_json(tmp_path / "m_eval.json").read_text())
    records[1]["eval_results"]["2 question 3"]["评判结果"]["1"] = "maybe"
    (tmp_path / "bad.json").write_text(json.dumps(records, ensure_ascii=False))
    with pytest.raises(BenchmarkDataError, match=r"bad.json system_id 2 turn 3 criterion 1: verdict 'maybe'"):
        score_sysbench_judged(tmp_path / "bad.json", tmp_path / "out")


def test_a_usable_flag_that_contradicts_the_verdicts_is_refused(tmp_path):
    rows = _detail_rows()
    rows[2]["是否可用"] = 1  # D1 turn 3 has a 否
    with pytest.raises(BenchmarkDataError, match=r"row 4 \(system_id 1\): 是否可用 is 1 but the verdicts \['否', '是'\] "
                                                 r"make it 0"):
        read_sysbench_workbook(_write_workbook(tmp_path / "bad.xlsx", rows))


def test_a_workbook_without_the_detail_sheet_names_the_sheets_it_has(tmp_path):
    with pd.ExcelWriter(tmp_path / "other.xlsx") as writer:
        pd.DataFrame([{"a": 1}]).to_excel(writer, sheet_name="Sheet1", index=False)
    with pytest.raises(BenchmarkDataError, match=r"other.xlsx: has no sheet '详情' \(sheets: \['Sheet1'\]\)"):
        score_sysbench_judged(tmp_path / "other.xlsx", tmp_path / "out")


def test_wrong_files_and_options_are_one_line_naming_the_problem(book, tmp_path):
    cf = tmp_path / "cf_eval.json"
    cf.write_text(json.dumps([{"idx": 1, "split": "easy", "criteria": [["c", "主需", "t", "s"]], "judge_score": ["1"]}]))
    out = str(tmp_path / "out")
    assert cli_error("align", "eval", "sysbench", "--judged", str(cf), "--out", out) == (
        f"omni align eval: {cf}: holds CFBench records (fields ['split', 'judge_score']), not SysBench's; use "
        "`omni align eval cfbench`")
    assert cli_error("align", "eval", "cfbench", "--judged", str(book), "--out", out) == (
        f"omni align eval: {book}: is an Excel workbook where a JSON array is expected; only SysBench's published "
        "*_analysis.xlsx is read from a workbook (omni align eval sysbench --judged)")
    sysbench = _eval_json(tmp_path / "m_eval.json")
    assert cli_error("align", "eval", "cfbench", "--judged", str(sysbench), "--out", out) == (
        f"omni align eval: {sysbench}: holds SysBench records (fields ['messages', 'eval_results']), not "
        "CFBench's; use `omni align eval sysbench`")
    with pytest.raises(BenchmarkDataError, match=r"cf_eval.json: holds CFBench records \(fields \['split', "
                                                 r"'judge_score'\]\), not SysBench's"):
        load_sysbench(cf)  # --data too
    assert cli_error("align", "eval", "sysbench", "--judged", str(book), "--out", out, "--official-rounding") == (
        "omni align eval sysbench: --official-rounding is CFBench's (its scorer rounds each item's scores); "
        "SysBench's published figures are unrounded ratios of counts: drop the option")
    with pytest.raises(BenchmarkDataError, match=r"is an Excel workbook where a JSON array is expected"):
        score_cfbench_judged(book, tmp_path / "out")


def test_a_workbook_without_openpyxl_names_the_extra_to_install(book, tmp_path):
    """`omni align eval` with openpyxl made unimportable (sys.modules[name] = None, as Python marks it)."""
    root = Path(__file__).resolve().parents[2]
    without = "import runpy, sys; sys.modules['openpyxl'] = None; runpy.run_module('omni.cli', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", without, "align", "eval", "sysbench", "--judged", str(book),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"omni align eval: {book}: reading a workbook needs openpyxl; install the bench extra: pip install -e .[bench]")

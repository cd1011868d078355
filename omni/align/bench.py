"""SysBench and CFBench: read the official data, answer with a model, judge, score, report.

Files read and written use the benchmarks' own layouts, so official outputs can be scored here
(`score_*_judged`) and ours can be read by the official tools:

SysBench (github.com/PKU-Baichuan-MLSystemLab/SysBench, datas/system_benchmark_eval_datas.json):
    [{"system_id", "system_prompt", "messages": [system, user, assistant, ... 5 turns],
      "prompt_infos": {user content: {"alignment": "align"|"misalign",
                                      "criteria": {"1": {"criteria_id", "criteria_content", "criteria_type"}}}},
      "rounds_related": bool, "领域": domain, "场景": scene}]
  `prompt_infos` may also be a list with one entry per user turn (then eval_results is a list too),
  and criteria a list of {"id", "content", "type"}; a criterion may carry a `rule` for RuleJudge.
  The assistant messages are the ground truth. History modes (the official two scripts):
    model  each turn sees the model's own earlier replies (eval_system_bench.py)
    gt     each turn sees the ground-truth earlier replies (eval_system_bench_with_gt.py)
  Judged layout (the official eval script's <model>_eval.json): each dialogue plus "infer_results"
  and "eval_results": {user content: {"评判结果": {"1": verdict}, "criteria", "response", "评判理由"}},
  a verdict being 是, 否 or another word of the official judge (omni/align/metrics.py VERDICTS).
  Published results: <model>_analysis.xlsx, sheet 详情, one row per judged turn with the columns
  system_id, 领域, 场景, multi_rounds_related, alignment, round_index, prompt, 评判结果
  ("<id>. <type> | <verdict>" per line) and 是否可用 (1 unless a verdict is 否).
CFBench (github.com/PKU-Baichuan-MLSystemLab/CFBench, data/cfbench_data.json):
    [{"idx", "prompt", "gold", "split": "easy"|"hard", "doamin", "scenario", "source",
      "criteria": [[text, "主需"|"次需" (or primary|secondary), type, subtype], ...]}]
  Judged layout: each item plus "response", "judge_response", "judge_score": ["1", "0", ...],
  "judge_parsing": "1"|"0"|"-1", "judge_metric": {"CSR", "ISR", "PSR"}.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from omni.align.judge import Criterion, JudgeTask, settle
from omni.align.metrics import (
    NO,
    VERDICTS,
    YES,
    CFItem,
    MetricError,
    SysDialogue,
    SysTurn,
    cfbench_item_metrics,
    cfbench_markdown,
    cfbench_metrics,
    sysbench_markdown,
    sysbench_metrics,
)

log = logging.getLogger(__name__)
HISTORY_MODES = ("model", "gt")
WORKBOOK = "详情"  # the sheet of SysBench's *_analysis.xlsx that lists every judged turn
WORKBOOK_COLUMNS = ("system_id", "multi_rounds_related", "alignment", "round_index", "prompt", "评判结果",
                    "是否可用")
RESULT_LINE = re.compile(r"(\d+)\. (.*) \| (.*)")  # a 评判结果 line: "<id>. <type> | <verdict>"
ALIASES = {"yes": YES, "true": YES, "1": YES, "1.0": YES, "no": NO, "false": NO, "0": NO, "0.0": NO}


class BenchmarkDataError(ValueError):
    """A benchmark file does not have the layout it should; the message names file, item and field."""


def is_workbook(path: str | Path) -> bool:
    """An .xlsx file (a zip archive), whatever its name says."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _load_array(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_file() and is_workbook(path):
        raise BenchmarkDataError(f"{path}: is an Excel workbook where a JSON array is expected; only SysBench's "
                                 "published *_analysis.xlsx is read from a workbook "
                                 "(omni align eval sysbench --judged)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchmarkDataError(f"{path}: cannot read a JSON array ({e})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise BenchmarkDataError(f"{path}: expected a JSON array of objects")
    return data


# fields only the other benchmark's files have: SysBench's dialogues, CFBench's items
OWN_FIELDS = {"SysBench": ("messages", "eval_results"), "CFBench": ("split", "judge_score")}


def _not_the_other_benchmark(records: list[dict], benchmark: str, where) -> None:
    """A CFBench file given to SysBench, or the reverse, named as such."""
    other = "CFBench" if benchmark == "SysBench" else "SysBench"
    found = [f for f in OWN_FIELDS[other] if records and f in records[0]]
    if found:
        raise BenchmarkDataError(f"{where}: holds {other} records (fields {found}), not {benchmark}'s; use "
                                 f"`omni align eval {other.lower()}`")


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _verdict(value, where: str) -> str:
    """是, 否 or another verdict of the official judge; yes/no, true/false and 1/0 read as 是/否."""
    if isinstance(value, bool):
        return YES if value else NO
    text = str(value).strip()
    text = ALIASES.get(text.lower(), text)
    if text not in VERDICTS:
        raise BenchmarkDataError(f"{where}: verdict {value!r} is none of the official judge's ({', '.join(VERDICTS)}) "
                                 "nor yes/no, true/false, 1/0")
    return text


# ================================================================ SysBench
@dataclass
class SysCase:
    system_id: str
    system: str
    users: list[str]
    references: list[str | None]         # ground-truth assistant replies
    alignments: list[str]
    criteria: list[list[Criterion]]
    raw_criteria: list                   # per turn, as in the file (written back into eval_results)
    keyed: bool                          # prompt_infos keyed by user content (official) or a list
    raw: dict


def _sys_criteria(raw, where: str) -> list[Criterion]:
    if isinstance(raw, dict):
        items = sorted(raw.items(), key=lambda kv: int(kv[0]))
        out = [Criterion(str(k), v["criteria_content"], v.get("criteria_type", ""), v.get("rule")) for k, v in items]
    elif isinstance(raw, list):
        out = [Criterion(str(c.get("id", c.get("criteria_id", i + 1))),
                         c.get("content", c.get("criteria_content", c.get("text"))),
                         c.get("type", c.get("criteria_type", "")), c.get("rule")) for i, c in enumerate(raw)]
    else:
        raise BenchmarkDataError(f"{where}: criteria must be a dict or a list")
    if not out or any(not isinstance(c.text, str) for c in out):
        raise BenchmarkDataError(f"{where}: criteria must be a non-empty checklist with text for each item")
    return out


def load_sysbench(path: str | Path, limit: int | None = None) -> list[SysCase]:
    records = _load_array(path)[:limit]
    _not_the_other_benchmark(records, "SysBench", path)
    cases = []
    for n, d in enumerate(records):
        sid = str(d.get("system_id", n))
        where = f"{path} system_id {sid}"
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BenchmarkDataError(f"{where}: 'messages' must be a non-empty list")
        system = d.get("system_prompt")
        if msgs[0].get("role") == "system":
            system = msgs[0]["content"]
            msgs = msgs[1:]
        users, refs = [], []
        for i, m in enumerate(msgs):
            role, prev = m.get("role"), msgs[i - 1].get("role") if i else "system"
            if role == "user" and prev in ("system", "assistant"):
                users.append(m["content"])
                refs.append(None)
            elif role == "assistant" and prev == "user":
                refs[-1] = m["content"]
            else:
                raise BenchmarkDataError(f"{where}: messages must alternate user/assistant after the system message "
                                         f"(message {i} has role {role!r})")
        infos = d.get("prompt_infos")
        keyed = isinstance(infos, dict)
        if keyed:
            if len(set(users)) != len(users):
                raise BenchmarkDataError(f"{where}: prompt_infos is keyed by user content but two turns repeat it; "
                                         "give prompt_infos as a list, one per user turn")
            missing = [u[:40] for u in users if u not in infos]
            if missing:
                raise BenchmarkDataError(f"{where}: prompt_infos has no entry for user turn(s) {missing}")
            per_turn = [infos[u] for u in users]
        elif isinstance(infos, list) and len(infos) == len(users):
            per_turn = infos
        else:
            raise BenchmarkDataError(f"{where}: prompt_infos must map each user turn's content to its info, "
                                     f"or list one info per user turn ({len(users)})")
        cases.append(SysCase(
            sid, system or "", users, refs, [str(p.get("alignment", "unknown")) for p in per_turn],
            [_sys_criteria(p.get("criteria"), f"{where} turn {t + 1}") for t, p in enumerate(per_turn)],
            [p.get("criteria") for p in per_turn], keyed, d))
    return cases


def _conversation(system: str, users: list[str], replies: list[str], t: int) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for u, r in zip(users[:t], replies[:t]):
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": r}]
    return msgs + [{"role": "user", "content": users[t]}]


def answer_sysbench(cases: list[SysCase], generator, history: str = "model", max_new_tokens: int = 512
                    ) -> tuple[list[list[str]], list[list[list[dict]]]]:
    """Replies per case and turn, and the conversation each reply answered."""
    if history not in HISTORY_MODES:
        raise ValueError(f"history {history!r}: choose one of {HISTORY_MODES}")
    replies: list[list[str]] = [[] for _ in cases]
    convs: list[list[list[dict]]] = [[] for _ in cases]
    if history == "gt":
        lacking = [c.system_id for c in cases if any(r is None for r in c.references[:-1])]
        if lacking:
            raise BenchmarkDataError(f"history gt needs the ground-truth assistant replies; missing in {lacking[:5]}")
        jobs = [(i, t) for i, c in enumerate(cases) for t in range(len(c.users))]
        for i, t in jobs:
            convs[i].append(_conversation(cases[i].system, cases[i].users, cases[i].references, t))
        out = generator.chat([convs[i][t] for i, t in jobs], max_new_tokens=max_new_tokens)
        for (i, _), r in zip(jobs, out):
            replies[i].append(r)
        return replies, convs
    for t in range(max(len(c.users) for c in cases)):
        live = [i for i, c in enumerate(cases) if len(c.users) > t]
        batch = [_conversation(cases[i].system, cases[i].users, replies[i], t) for i in live]
        for i, conv, r in zip(live, batch, generator.chat(batch, max_new_tokens=max_new_tokens)):
            convs[i].append(conv)
            replies[i].append(r)
    return replies, convs


def judge_sysbench(cases, replies, convs, judge, undecided: str = "error") -> list[list[list[bool | None]]]:
    tasks, index = [], []
    for i, c in enumerate(cases):
        for t, user in enumerate(c.users):
            conv = convs[i][t]
            history = [m for m in conv[:-1] if m["role"] != "system"]
            tasks.append(JudgeTask(user, replies[i][t], c.criteria[t], c.system or None, history))
            index.append((i, t))
    got = judge.judge(tasks)
    out: list[list] = [[None] * len(c.users) for c in cases]
    for (i, t), v in zip(index, got):
        out[i][t] = settle(v, undecided, f"SysBench system_id {cases[i].system_id} turn {t + 1}")
    return out


def sysbench_records(cases, replies, convs, verdicts, history: str, model_name: str, judge_name: str) -> list[dict]:
    """The official infer + eval layout (one dict per dialogue)."""
    records = []
    for c, rs, cs, vs in zip(cases, replies, convs, verdicts):
        rec = dict(c.raw)
        rec["infer_model"] = model_name
        rec["infer_results"] = ([conv + [{"role": "assistant", "content": r}] for conv, r in zip(cs, rs)]
                                if history == "gt" else cs[-1] + [{"role": "assistant", "content": rs[-1]}])
        per_turn = []
        for t, (user, reply, crits, verdict) in enumerate(zip(c.users, rs, c.criteria, vs)):
            result = {cr.id: (YES if v else NO) for cr, v in zip(crits, verdict) if v is not None}
            if not result:
                raise BenchmarkDataError(f"SysBench system_id {c.system_id} turn {t + 1}: every criterion was "
                                         "undecided and skipped; nothing left to score")
            per_turn.append({"评判理由": f"omni judge: {judge_name}", "评判结果": result,
                             "criteria": c.raw_criteria[t], "response": reply})
        rec["eval_results"] = dict(zip(c.users, per_turn)) if c.keyed else per_turn
        records.append(rec)
    return records


def parse_sysbench_judged(records: list[dict], where: str = "judged file") -> list[SysDialogue]:
    """Official eval layout (or ours) -> dialogues for `sysbench_metrics`."""
    _not_the_other_benchmark(records, "SysBench", where)
    dialogues = []
    for n, d in enumerate(records):
        sid = str(d.get("system_id", n))
        w = f"{where} system_id {sid}"
        results = d.get("eval_results")
        if results is None:
            raise BenchmarkDataError(f"{w}: eval_results is missing or null (the judge failed on this dialogue)")
        users = [m["content"] for m in d.get("messages") or [] if m.get("role") == "user"]
        if not users:
            raise BenchmarkDataError(f"{w}: 'messages' holds no user turn")
        infos = d.get("prompt_infos") or {}
        turns = []
        for t, user in enumerate(users):
            r = results.get(user) if isinstance(results, dict) else (results[t] if t < len(results) else None)
            if r is None:
                raise BenchmarkDataError(f"{w} turn {t + 1}: no eval result for this user turn")
            info = infos.get(user, {}) if isinstance(infos, dict) else (infos[t] if t < len(infos) else {})
            verdicts = r.get("评判结果", r.get("results"))
            if not isinstance(verdicts, dict) or not verdicts:
                raise BenchmarkDataError(f"{w} turn {t + 1}: '评判结果' must be a non-empty dict id -> verdict")
            crit = r.get("criteria") or info.get("criteria") or {}
            types = {c.id: c.type for c in _sys_criteria(crit, f"{w} turn {t + 1}")} if crit else {}
            keys = sorted(verdicts, key=lambda k: int(k))
            turns.append(SysTurn(user, [_verdict(verdicts[k], f"{w} turn {t + 1} criterion {k}") for k in keys],
                                 [types.get(str(k), "unknown") for k in keys], str(info.get("alignment", "unknown"))))
        dialogues.append(SysDialogue(sid, turns, d.get("rounds_related"), d.get("领域", d.get("domain")),
                                     d.get("场景", d.get("scene"))))
    return dialogues


def read_sysbench_workbook(path: str | Path) -> list[SysDialogue]:
    """A published <model>_analysis.xlsx (sheet 详情, one row per judged turn) -> dialogues."""
    try:
        import openpyxl
    except ImportError:
        raise BenchmarkDataError(f"{path}: reading a workbook needs openpyxl; install the bench extra: "
                                 "pip install -e .[bench]") from None
    try:
        book = openpyxl.load_workbook(path, read_only=True)
    except Exception as e:  # noqa: BLE001 - openpyxl raises zip, XML and key errors for a damaged file
        raise BenchmarkDataError(f"{path}: not a readable .xlsx workbook ({type(e).__name__}: {e})") from None
    if WORKBOOK not in book.sheetnames:
        raise BenchmarkDataError(f"{path}: has no sheet {WORKBOOK!r} (sheets: {book.sheetnames}); SysBench's "
                                 "*_analysis.xlsx lists every judged turn there")
    rows = book[WORKBOOK].iter_rows(values_only=True)
    header = list(next(rows, None) or ())
    missing = [c for c in WORKBOOK_COLUMNS if c not in header]
    if missing:
        raise BenchmarkDataError(f"{path} sheet {WORKBOOK}: no column(s) {missing}; the official analysis writes "
                                 f"{list(WORKBOOK_COLUMNS)}")
    dialogues: dict[str, SysDialogue] = {}
    rounds: dict[str, list] = {}
    for n, row in enumerate(rows, start=2):
        if all(v is None for v in row):
            continue
        r = dict(zip(header, row))
        sid = str(r["system_id"])
        w = f"{path} sheet {WORKBOOK} row {n} (system_id {sid})"
        verdicts, types = [], []
        for line in str(r["评判结果"] or "").split("\n"):
            m = RESULT_LINE.fullmatch(line.strip())
            if m is None:
                raise BenchmarkDataError(f"{w}: 评判结果 line {line!r} is not '<id>. <type> | <verdict>'")
            verdicts.append(_verdict(m[3], f"{w} criterion {m[1]}"))
            types.append(m[2])
        usable = NO not in verdicts
        if r["是否可用"] not in (0, 1) or bool(r["是否可用"]) != usable:
            raise BenchmarkDataError(f"{w}: 是否可用 is {r['是否可用']!r} but the verdicts {verdicts} make it "
                                     f"{int(usable)} (1 unless a verdict is 否)")
        if not isinstance(r["multi_rounds_related"], bool):
            raise BenchmarkDataError(f"{w}: multi_rounds_related is {r['multi_rounds_related']!r}, not TRUE or FALSE")
        d = dialogues.setdefault(sid, SysDialogue(sid, [], r["multi_rounds_related"], r.get("领域"), r.get("场景")))
        d.turns.append(SysTurn(str(r["prompt"]), verdicts, types, str(r["alignment"])))
        rounds.setdefault(sid, []).append(r["round_index"])
    if not dialogues:
        raise BenchmarkDataError(f"{path} sheet {WORKBOOK}: no judged turns")
    for sid, d in dialogues.items():
        if sorted(rounds[sid]) != list(range(1, len(d.turns) + 1)):
            raise BenchmarkDataError(f"{path} sheet {WORKBOOK} system_id {sid}: round_index {rounds[sid]} is not "
                                     f"1..{len(d.turns)}")
        d.turns = [t for _, t in sorted(zip(rounds[sid], d.turns), key=lambda p: p[0])]
    return list(dialogues.values())


def _report(out_dir: Path, name: str, metrics: dict, markdown: str) -> dict:
    _write(out_dir / f"{name}_metrics.json", metrics)
    (out_dir / f"{name}.md").write_text(markdown, encoding="utf-8")
    log.info("%s: wrote %s and %s", name, out_dir / f"{name}_metrics.json", out_dir / f"{name}.md")
    return metrics


def run_sysbench(data: str | Path, out_dir: str | Path, generator, judge, history: str = "model",
                 undecided: str = "error", limit: int | None = None, max_new_tokens: int = 512,
                 model_name: str = "model") -> dict:
    """Answer, judge and score; writes sysbench_{infer,eval,metrics}.json and sysbench.md."""
    out_dir = Path(out_dir)
    cases = load_sysbench(data, limit)
    replies, convs = answer_sysbench(cases, generator, history, max_new_tokens)
    verdicts = judge_sysbench(cases, replies, convs, judge, undecided)
    records = sysbench_records(cases, replies, convs, verdicts, history, model_name, judge.name)
    _write(out_dir / "sysbench_eval.json", records)
    metrics = sysbench_metrics(parse_sysbench_judged(records))
    metrics["setup"] = {"data": str(data), "history": history, "judge": judge.name, "model": model_name,
                        "undecided": undecided}
    title = f"SysBench ({model_name}, {history} history)"
    return _report(out_dir, "sysbench", metrics, sysbench_markdown(metrics, title))


def score_sysbench_judged(path: str | Path, out_dir: str | Path) -> dict:
    """The official eval script's JSON, ours, or a published *_analysis.xlsx (told apart by content)."""
    if Path(path).is_file() and is_workbook(path):
        dialogues = read_sysbench_workbook(path)
    else:
        dialogues = parse_sysbench_judged(_load_array(path), str(path))
    metrics = sysbench_metrics(dialogues)
    metrics["setup"] = {"judged": str(path)}
    return _report(Path(out_dir), "sysbench", metrics, sysbench_markdown(metrics, f"SysBench ({Path(path).name})"))


# ================================================================ CFBench
def load_cfbench(path: str | Path, limit: int | None = None) -> list[dict]:
    items = _load_array(path)[:limit]
    _not_the_other_benchmark(items, "CFBench", path)
    for n, it in enumerate(items):
        w = f"{path} item idx {it.get('idx', n)}"
        for key in ("prompt", "split", "criteria"):
            if key not in it:
                raise BenchmarkDataError(f"{w}: missing field {key!r}")
        crit = it["criteria"]
        if not isinstance(crit, list) or not crit or not all(isinstance(c, list) and len(c) >= 2 for c in crit):
            raise BenchmarkDataError(f"{w}: criteria must be a non-empty list of [text, priority, type, subtype]")
    return items


def _cf_criteria(item: dict) -> list[Criterion]:
    return [Criterion(str(k + 1), c[0], c[2] if len(c) > 2 else "",
                      c[4] if len(c) > 4 and isinstance(c[4], dict) else None) for k, c in enumerate(item["criteria"])]


def parse_cfbench_judged(items: list[dict], where: str = "judged file") -> list[CFItem]:
    _not_the_other_benchmark(items, "CFBench", where)
    out = []
    for n, it in enumerate(items):
        idx = it.get("idx", n)
        w = f"{where} item idx {idx}"
        if "judge_score" not in it or "criteria" not in it or "split" not in it:
            raise BenchmarkDataError(f"{w}: a judged item needs 'criteria', 'split' and 'judge_score'")
        try:
            scores = [int(float(s)) for s in it["judge_score"]]
        except (TypeError, ValueError):
            raise BenchmarkDataError(f"{w}: judge_score must be a list of 0/1, got {it['judge_score']!r}") from None
        parsing = str(it.get("judge_parsing", "1" if len(scores) == len(it["criteria"]) else "0"))
        out.append(CFItem(idx, it["split"], it["criteria"], scores, parsing, it.get("doamin", it.get("domain")),
                          it.get("scenario")))
    return out


def run_cfbench(data: str | Path, out_dir: str | Path, generator, judge, undecided: str = "error",
                limit: int | None = None, max_new_tokens: int = 1024, model_name: str = "model",
                official_rounding: bool = False) -> dict:
    """Answer, judge and score; writes cfbench_eval.json (official judge layout), cfbench_metrics.json
    and cfbench.md. With `undecided: skip`, undecided criteria are removed from the item."""
    out_dir = Path(out_dir)
    items = load_cfbench(data, limit)
    replies = generator.chat([[{"role": "user", "content": it["prompt"]}] for it in items],
                             max_new_tokens=max_new_tokens)
    tasks = [JudgeTask(it["prompt"], r, _cf_criteria(it), reference=it.get("gold") or None)
             for it, r in zip(items, replies)]
    records = []
    for it, reply, task, verdict in zip(items, replies, tasks, judge.judge(tasks)):
        verdict = settle(verdict, undecided, f"CFBench item idx {it.get('idx')}")
        keep = [k for k, v in enumerate(verdict) if v is not None]
        if not keep:
            log.warning("CFBench item %s: every criterion undecided and skipped; item left out", it.get("idx"))
            continue
        rec = dict(it)
        if len(keep) < len(verdict):
            rec["criteria"] = [it["criteria"][k] for k in keep]
            rec["criteria_skipped"] = [it["criteria"][k] for k in range(len(verdict)) if k not in keep]
        scores = [str(int(verdict[k])) for k in keep]
        rec.update(response=reply, infer_model=model_name, judge_model=judge.name,
                   judge_response="\n\n".join(f"{rec['criteria'][j][0]}\t{s}" for j, s in enumerate(scores)),
                   judge_score=scores, judge_parsing="1")
        records.append(rec)
    parsed = parse_cfbench_judged(records)
    for rec, item in zip(records, parsed):
        rec["judge_metric"] = cfbench_item_metrics(item, official_rounding)
    _write(out_dir / "cfbench_eval.json", records)
    metrics = cfbench_metrics(parsed, official_rounding)
    metrics["setup"] = {"data": str(data), "judge": judge.name, "model": model_name, "undecided": undecided,
                        "official_rounding": official_rounding}
    return _report(out_dir, "cfbench", metrics, cfbench_markdown(metrics, f"CFBench ({model_name})"))


def score_cfbench_judged(path: str | Path, out_dir: str | Path, official_rounding: bool = False) -> dict:
    metrics = cfbench_metrics(parse_cfbench_judged(_load_array(path), str(path)), official_rounding)
    metrics["setup"] = {"judged": str(path), "official_rounding": official_rounding}
    return _report(Path(out_dir), "cfbench", metrics, cfbench_markdown(metrics, f"CFBench ({Path(path).name})"))


__all__ = [
    "BenchmarkDataError",
    "MetricError",
    "answer_sysbench",
    "judge_sysbench",
    "load_cfbench",
    "load_sysbench",
    "parse_cfbench_judged",
    "parse_sysbench_judged",
    "read_sysbench_workbook",
    "run_cfbench",
    "run_sysbench",
    "score_cfbench_judged",
    "score_sysbench_judged",
]

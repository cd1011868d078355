"""SysBench and CFBench metrics from judged results: pure arithmetic, no model, no judge.

Definitions (docs/align.md states them with the papers' wording and the official scorers' code):

SysBench (Qin et al. 2024, arXiv:2408.10943). A dialogue = a system message + T user turns
(T = 5); each user turn is one *instruction* with a checklist of *constraints*, each judged 是
(met), 否 (not met) or, from the official GPT-4o judge, another word (不适用, 无法判断, 部分, ...).
The figures are the ones the benchmark publishes (its analysis code's sheets and plotting code):
    CSR  = constraints judged 是 / all constraints     any other verdict counts as not met
    ISR  = instructions with no 否 / all instructions  the official "usable" flag (是否可用): a verdict
                                                       such as 不适用 does not fail an instruction
    SSR  = 1/D sum_d (c_d / T_d)                       c_d = consecutive usable turns from turn 1
    CSR_per_instruction = mean over instructions of the fraction judged 是 (the paper's formula;
                                                       its tables print the constraint-level CSR)
    turn t: ISR at turn t and the dialogues whose turns 1..t are all usable; `all_yes` and
    `all_yes_continuous` use the analysis sheets' stricter per-turn rule (every verdict 是).

CFBench (Zhang et al. 2024, arXiv:2408.01122). An item = one instruction with n >= 1 criteria,
each `[text, priority, type, subtype]`, priority primary ("主需") or secondary ("次需").
    CSR_i = mean_j s_ij          ISR_i = prod_j s_ij
    PSR_i = 1 if every primary criterion is met and the secondary ones pass a threshold:
            only primaries -> 1; only secondaries -> CSR_i > 0.8;
            both -> 0.5 + 0.5 * mean(secondary) > 0.8 (i.e. mean(secondary) > 0.6)
    Items whose judge output could not be aligned with the criteria (`judge_parsing` "0") use
    PSR_i = CSR_i > 0.8 over the scores that were parsed; unparsable ones ("-1") score 0.
    CSR / ISR / PSR = means over the items of the easy split, the hard split and all items.
`official_rounding=True` reproduces the official scorer's rounding (per-item CSR and mean of the
secondary scores to 2 decimals, final means to 2 decimals); the default keeps full precision.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

# SysBench's six constraint types (criteria_type) and the names its paper uses
SYSBENCH_TYPES = {"动作约束": "action", "内容约束": "content", "背景约束": "background",
                  "角色约束": "role", "格式约束": "format", "风格约束": "style"}
YES, NO = "是", "否"
# the official GPT-4o judge's other verdicts, as found in the published workbooks: not met for the
# CSR, yet no failure of the instruction (the official code fails an instruction on 否 only)
OTHER_VERDICTS = ("不适用", "无法判断", "无法评判", "部分", "部分是", "忽略")
VERDICTS = (YES, NO, *OTHER_VERDICTS)
PRIMARY = {"主需", "primary", "main"}
SECONDARY = {"次需", "secondary"}


class MetricError(ValueError):
    """Judged results that cannot be scored (missing field, empty checklist, unknown priority)."""


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _r2(x: float) -> float:
    return round(x, 2)


# ================================================================ SysBench
@dataclass
class SysTurn:
    prompt: str
    verdicts: list[str]                     # one of VERDICTS per constraint, in criteria-id order
    types: list[str]                        # constraint type per constraint
    alignment: str = "unknown"              # "align" | "misalign" (user turn vs system message)

    @property
    def met(self) -> int:
        return sum(v == YES for v in self.verdicts)

    @property
    def usable(self) -> bool:
        return NO not in self.verdicts

    @property
    def all_yes(self) -> bool:
        return all(v == YES for v in self.verdicts)


@dataclass
class SysDialogue:
    system_id: str
    turns: list[SysTurn]
    rounds_related: bool | None = None      # True: turns depend on each other ("dependent")
    domain: str | None = None
    scene: str | None = None


def _streak(flags) -> int:
    """Turns from turn 1 up to the first False."""
    n = 0
    for ok in flags:
        if not ok:
            break
        n += 1
    return n


def _checked(d: SysDialogue) -> SysDialogue:
    if not d.turns:
        raise MetricError(f"SysBench dialogue {d.system_id}: no judged turns")
    for t, turn in enumerate(d.turns, 1):
        if not turn.verdicts:
            raise MetricError(f"SysBench dialogue {d.system_id} turn {t}: empty constraint checklist")
    return d


def _sys_summary(dialogues: list[SysDialogue]) -> dict:
    turns = [t for d in dialogues for t in _checked(d).turns]
    met, total = sum(t.met for t in turns), sum(len(t.verdicts) for t in turns)
    return {"CSR": met / total if total else None,
            "ISR": _mean(int(t.usable) for t in turns),
            "SSR": _mean(_streak(t.usable for t in d.turns) / len(d.turns) for d in dialogues),
            "CSR_per_instruction": _mean(t.met / len(t.verdicts) for t in turns),
            "dialogues": len(dialogues), "instructions": len(turns), "constraints": total}


def _by_turn(dialogues: list[SysDialogue]) -> dict:
    out = {}
    for t in range(max(len(d.turns) for d in dialogues)):
        ds = [d for d in dialogues if len(d.turns) > t]
        out[str(t + 1)] = {
            "ISR": _mean(int(d.turns[t].usable) for d in ds),
            "continuous": _mean(int(_streak(x.usable for x in d.turns) > t) for d in ds),
            "all_yes": _mean(int(d.turns[t].all_yes) for d in ds),
            "all_yes_continuous": _mean(int(_streak(x.all_yes for x in d.turns) > t) for d in ds),
            "n": len(ds)}
    return out


def _by_alignment(dialogues: list[SysDialogue]) -> dict:
    groups = defaultdict(list)
    for d in dialogues:
        for turn in d.turns:
            groups[turn.alignment].append(turn)
    return {k: {"CSR": sum(t.met for t in ts) / sum(len(t.verdicts) for t in ts),
                "ISR": _mean(int(t.usable) for t in ts), "instructions": len(ts)}
            for k, ts in sorted(groups.items())}


def sysbench_metrics(dialogues: list[SysDialogue]) -> dict:
    """Overall CSR/ISR/SSR plus breakdowns by turn, alignment, dependent/parallel dialogues (each
    again by turn and alignment, as the official sheets), constraint type, domain, and the count
    of each verdict."""
    if not dialogues:
        raise MetricError("SysBench: no judged dialogues to score")
    out = {"overall": _sys_summary(dialogues), "by_turn": _by_turn(dialogues), "by_alignment": _by_alignment(dialogues)}

    related = defaultdict(list)
    for d in dialogues:
        key = "unknown" if d.rounds_related is None else ("dependent" if d.rounds_related else "parallel")
        related[key].append(d)
    out["by_dependency"] = {k: {**_sys_summary(ds), "by_turn": _by_turn(ds), "by_alignment": _by_alignment(ds)}
                            for k, ds in sorted(related.items())}

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    verdicts: dict[str, int] = defaultdict(int)
    for d in dialogues:
        for turn in d.turns:
            for v, kind in zip(turn.verdicts, turn.types):
                counts[kind][0] += int(v == YES)
                counts[kind][1] += 1
                verdicts[v] += 1
    out["by_constraint_type"] = {
        kind: {"name": SYSBENCH_TYPES.get(kind, kind), "satisfied": s, "total": n, "rate": s / n}
        for kind, (s, n) in sorted(counts.items())}

    domains = defaultdict(list)
    for d in dialogues:
        domains[d.domain or "unknown"].append(d)
    out["by_domain"] = {k: _sys_summary(ds) for k, ds in sorted(domains.items())}
    out["verdicts"] = {v: verdicts[v] for v in VERDICTS if verdicts[v]}
    return out


# ================================================================ CFBench
@dataclass
class CFItem:
    idx: object
    split: str                               # "easy" | "hard"
    criteria: list[list[str]]                # [text, priority, type, subtype]
    scores: list[int]                        # judge's 0/1 per criterion
    parsing: str = "1"                       # "1": scores align with criteria, "0": partial, "-1": failed
    domain: str | None = None
    scenario: str | None = None
    extra: dict = field(default_factory=dict)


def _priority(value: str, idx) -> str:
    if value in PRIMARY:
        return "primary"
    if value in SECONDARY:
        return "secondary"
    raise MetricError(f"CFBench item {idx}: criterion priority {value!r} is neither primary "
                      f"({sorted(PRIMARY)}) nor secondary ({sorted(SECONDARY)})")


def cfbench_item_metrics(item: CFItem, official_rounding: bool = False) -> dict:
    """CSR, ISR, PSR of one item (see the module docstring)."""
    if item.parsing not in ("1", "0", "-1"):
        raise MetricError(f"CFBench item {item.idx}: judge_parsing {item.parsing!r} is not '1', '0' or '-1'")
    if not item.scores:
        raise MetricError(f"CFBench item {item.idx}: no judge scores")
    if any(s not in (0, 1) for s in item.scores):
        raise MetricError(f"CFBench item {item.idx}: judge scores must be 0 or 1, got {item.scores}")
    csr = sum(item.scores) / len(item.scores)
    if official_rounding:
        csr = _r2(csr)
    isr = int(csr >= 1)
    if item.parsing == "-1":
        psr = 0
    elif item.parsing == "0":
        psr = int(csr > 0.8)
    else:
        if len(item.criteria) != len(item.scores):
            raise MetricError(f"CFBench item {item.idx}: {len(item.scores)} scores for {len(item.criteria)} criteria "
                              "(set judge_parsing to '0' for a partial parse)")
        prio = [_priority(c[1], item.idx) for c in item.criteria]
        primary = [s for s, p in zip(item.scores, prio) if p == "primary"]
        secondary = [s for s, p in zip(item.scores, prio) if p == "secondary"]
        if 0 in primary:
            psr = 0
        elif not primary:
            psr = int(csr > 0.8)
        elif not secondary:
            psr = 1
        else:
            sec = sum(secondary) / len(secondary)
            psr = int(0.5 + 0.5 * (_r2(sec) if official_rounding else sec) > 0.8)
    return {"CSR": csr, "ISR": isr, "PSR": psr}


def _cf_summary(rows: list[dict], official_rounding: bool) -> dict:
    if not rows:
        return {"CSR": None, "ISR": None, "PSR": None, "n": 0}
    out = {k: _mean(r[k] for r in rows) for k in ("CSR", "ISR", "PSR")}
    if official_rounding:
        out = {k: _r2(v) for k, v in out.items()}
    out["n"] = len(rows)
    return out


def cfbench_metrics(items: list[CFItem], official_rounding: bool = False) -> dict:
    """CSR/ISR/PSR over the easy, hard and full sets, plus breakdowns by constraint type,
    subtype, priority, domain and scenario."""
    if not items:
        raise MetricError("CFBench: no judged items to score")
    per = [cfbench_item_metrics(it, official_rounding) for it in items]
    splits = defaultdict(list)
    for it, m in zip(items, per):
        splits[it.split].append(m)
    unknown = sorted(set(splits) - {"easy", "hard"})
    if unknown:
        raise MetricError(f"CFBench: split must be 'easy' or 'hard', found {unknown}")
    out = {"easy": _cf_summary(splits["easy"], official_rounding),
           "hard": _cf_summary(splits["hard"], official_rounding),
           "full": _cf_summary(per, official_rounding)}

    kinds: dict[str, dict[str, list[int]]] = {"by_constraint_type": defaultdict(lambda: [0, 0]),
                                              "by_constraint_subtype": defaultdict(lambda: [0, 0]),
                                              "by_priority": defaultdict(lambda: [0, 0])}
    aligned = 0
    for it in items:
        if it.parsing != "1":
            continue  # scores do not line up with criteria: no per-criterion attribution
        aligned += 1
        for crit, s in zip(it.criteria, it.scores):
            for name, key in (("by_constraint_type", crit[2] if len(crit) > 2 else "unknown"),
                              ("by_constraint_subtype", crit[3] if len(crit) > 3 else "unknown"),
                              ("by_priority", _priority(crit[1], it.idx))):
                kinds[name][key][0] += s
                kinds[name][key][1] += 1
    for name, table in kinds.items():
        out[name] = {k: {"satisfied": s, "total": n, "rate": s / n} for k, (s, n) in sorted(table.items())}
    out["aligned_items"] = aligned

    for name, attr in (("by_domain", "domain"), ("by_scenario", "scenario")):
        groups = defaultdict(list)
        for it, m in zip(items, per):
            groups[getattr(it, attr) or "unknown"].append(m)
        out[name] = {k: _cf_summary(v, official_rounding) for k, v in sorted(groups.items())}
    out["items"] = [{"idx": it.idx, "split": it.split, **m} for it, m in zip(items, per)]
    return out


# ================================================================ reports
def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def sysbench_markdown(m: dict, title: str = "SysBench") -> str:
    o = m["overall"]
    parts = [f"# {title}", "",
             _table(["CSR", "ISR", "SSR", "CSR per instruction", "dialogues", "instructions", "constraints"],
                    [[o[k] for k in ("CSR", "ISR", "SSR", "CSR_per_instruction", "dialogues", "instructions",
                                     "constraints")]]),
             "", "Verdicts: " + ", ".join(f"{v} {n}" for v, n in m["verdicts"].items()),
             "", "## By turn", "",
             _table(["turn", "ISR at turn", "turns 1..t usable", "all 是 at turn", "turns 1..t all 是", "n"],
                    [[t, r["ISR"], r["continuous"], r["all_yes"], r["all_yes_continuous"], r["n"]]
                     for t, r in m["by_turn"].items()]),
             "", "## By alignment with the system message", "",
             _table(["alignment", "CSR", "ISR", "instructions"],
                    [[k, r["CSR"], r["ISR"], r["instructions"]] for k, r in m["by_alignment"].items()]),
             "", "## Dependent vs parallel turns", "",
             _table(["dialogues", "CSR", "ISR", "SSR", "n"],
                    [[k, r["CSR"], r["ISR"], r["SSR"], r["dialogues"]] for k, r in m["by_dependency"].items()]),
             "", "## By constraint type", "",
             _table(["type", "name", "satisfied", "total", "rate"],
                    [[k, r["name"], r["satisfied"], r["total"], r["rate"]]
                     for k, r in m["by_constraint_type"].items()]),
             "", "## By domain", "",
             _table(["domain", "CSR", "ISR", "SSR", "dialogues"],
                    [[k, r["CSR"], r["ISR"], r["SSR"], r["dialogues"]] for k, r in m["by_domain"].items()])]
    return "\n".join(parts) + "\n"


def cfbench_markdown(m: dict, title: str = "CFBench") -> str:
    parts = [f"# {title}", "",
             _table(["set", "CSR", "ISR", "PSR", "n"],
                    [[s, m[s]["CSR"], m[s]["ISR"], m[s]["PSR"], m[s]["n"]] for s in ("easy", "hard", "full")])]
    for name, label in (("by_priority", "priority"), ("by_constraint_type", "constraint type"),
                        ("by_constraint_subtype", "constraint subtype")):
        parts += ["", f"## By {label} (items whose judgments align with their criteria)", "",
                  _table([label, "satisfied", "total", "rate"],
                         [[k, r["satisfied"], r["total"], r["rate"]] for k, r in m[name].items()])]
    for name, label in (("by_domain", "domain"), ("by_scenario", "scenario")):
        parts += ["", f"## By {label}", "",
                  _table([label, "CSR", "ISR", "PSR", "n"],
                         [[k, r["CSR"], r["ISR"], r["PSR"], r["n"]] for k, r in m[name].items()])]
    return "\n".join(parts) + "\n"

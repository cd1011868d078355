"""SysBench and CFBench metrics from judged results: pure arithmetic, no model, no judge.

Definitions (docs/align.md states them with the papers' wording and the official scorers' code):

SysBench (Qin et al. 2024, arXiv:2408.10943). A dialogue = a system message + T user turns
(T = 5); each user turn is one *instruction* with m >= 1 checklist *constraints*; s_ij in {0, 1}.
    CSR  = 1/N sum_i (1/m_i sum_j s_ij)             mean over instructions of the satisfied fraction
    ISR  = 1/N sum_i prod_j s_ij                    fraction of instructions with every constraint met
    SSR  = 1/D sum_d (c_d / T_d)                    c_d = consecutive fully satisfied turns from turn 1
    CSR_micro = sum s_ij / sum m_i                  constraint-level rate (the "total" column of the
                                                    official scorer's per-constraint-type sheet)
    turn t: rate (instructions at turn t met) and continuous rate (dialogues whose turns 1..t all met)

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
    satisfied: list[bool]                   # one per constraint, in criteria-id order
    types: list[str]                        # constraint type per constraint
    alignment: str = "unknown"              # "align" | "misalign" (user turn vs system message)


@dataclass
class SysDialogue:
    system_id: str
    turns: list[SysTurn]
    rounds_related: bool | None = None      # True: turns depend on each other ("dependent")
    domain: str | None = None
    scene: str | None = None


def _dialogue_stats(d: SysDialogue) -> tuple[list[float], list[int], int]:
    """(per-turn satisfied fraction, per-turn all-met flag, consecutive met turns from turn 1)."""
    if not d.turns:
        raise MetricError(f"SysBench dialogue {d.system_id}: no judged turns")
    csr, isr = [], []
    for t, turn in enumerate(d.turns, 1):
        if not turn.satisfied:
            raise MetricError(f"SysBench dialogue {d.system_id} turn {t}: empty constraint checklist")
        csr.append(sum(turn.satisfied) / len(turn.satisfied))
        isr.append(int(all(turn.satisfied)))
    streak = 0
    for ok in isr:
        if not ok:
            break
        streak += 1
    return csr, isr, streak


def _sys_summary(dialogues: list[SysDialogue]) -> dict:
    csr, isr, ssr = [], [], []
    sat = total = 0
    for d in dialogues:
        c, i, streak = _dialogue_stats(d)
        csr += c
        isr += i
        ssr.append(streak / len(d.turns))
        sat += sum(sum(t.satisfied) for t in d.turns)
        total += sum(len(t.satisfied) for t in d.turns)
    return {"CSR": _mean(csr), "ISR": _mean(isr), "SSR": _mean(ssr), "CSR_micro": sat / total if total else None,
            "dialogues": len(dialogues), "instructions": len(csr), "constraints": total}


def sysbench_metrics(dialogues: list[SysDialogue]) -> dict:
    """Overall CSR/ISR/SSR plus breakdowns by turn, alignment, dependent/parallel dialogues,
    constraint type and domain."""
    if not dialogues:
        raise MetricError("SysBench: no judged dialogues to score")
    out = {"overall": _sys_summary(dialogues)}

    turns = max(len(d.turns) for d in dialogues)
    by_turn = {}
    for t in range(turns):
        met = [int(all(d.turns[t].satisfied)) for d in dialogues if len(d.turns) > t]
        cont = [int(_dialogue_stats(d)[2] > t) for d in dialogues if len(d.turns) > t]
        by_turn[str(t + 1)] = {"ISR": _mean(met), "continuous": _mean(cont), "n": len(met)}
    out["by_turn"] = by_turn

    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for d in dialogues:
        for turn in d.turns:
            groups["alignment"][turn.alignment].append(turn)
    out["by_alignment"] = {
        k: {"CSR": _mean(sum(t.satisfied) / len(t.satisfied) for t in ts),
            "ISR": _mean(int(all(t.satisfied)) for t in ts), "instructions": len(ts)}
        for k, ts in sorted(groups["alignment"].items())}

    related = defaultdict(list)
    for d in dialogues:
        key = "unknown" if d.rounds_related is None else ("dependent" if d.rounds_related else "parallel")
        related[key].append(d)
    out["by_dependency"] = {k: _sys_summary(ds) for k, ds in sorted(related.items())}

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d in dialogues:
        for turn in d.turns:
            for ok, kind in zip(turn.satisfied, turn.types):
                counts[kind][0] += int(ok)
                counts[kind][1] += 1
    out["by_constraint_type"] = {
        kind: {"name": SYSBENCH_TYPES.get(kind, kind), "satisfied": s, "total": n, "rate": s / n}
        for kind, (s, n) in sorted(counts.items())}

    domains = defaultdict(list)
    for d in dialogues:
        domains[d.domain or "unknown"].append(d)
    out["by_domain"] = {k: _sys_summary(ds) for k, ds in sorted(domains.items())}
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
             _table(["CSR", "ISR", "SSR", "CSR (constraint-level)", "dialogues", "instructions", "constraints"],
                    [[o[k] for k in ("CSR", "ISR", "SSR", "CSR_micro", "dialogues", "instructions", "constraints")]]),
             "", "## By turn", "",
             _table(["turn", "ISR at turn", "turns 1..t all met", "n"],
                    [[t, r["ISR"], r["continuous"], r["n"]] for t, r in m["by_turn"].items()]),
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

"""Constraint judges: does a reply satisfy each item of a checklist?

`judge(tasks) -> [[True | False | None, ...] per task]`, one verdict per criterion; None means
"this judge cannot decide" and the next judge of a `ChainJudge` is asked about those only.

- `RuleJudge` decides what a rule can: length (words / characters / CJK characters, paragraphs),
  keywords present or absent, start/end strings, JSON, bullet list, brackets, letter case and
  language (English / Chinese). A criterion carries its rule explicitly (`Criterion.rule`, e.g.
  `{"kind": "max_words", "n": 50}`) or the rule is read from its text by the patterns below, and
  only when the text says nothing else (after removing the matched phrase and filler words, at
  most 1 other word remains): "answer in JSON and mention the price" is left to a model judge.
- `ModelJudge` asks an LLM (any `Generator`: a local model or an OpenAI-compatible endpoint)
  for one "<number>: yes|no" line per criterion; unparsable items come back None.
- `ChainJudge([rules, model])`: rules first, the model for what rules left open.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from omni.align.generate import Generator


@dataclass
class Criterion:
    id: str
    text: str
    type: str = ""
    rule: dict | None = None


@dataclass
class JudgeTask:
    prompt: str                                  # the user message being answered
    response: str                                # the reply under judgment
    criteria: list[Criterion]
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # earlier user/assistant turns
    reference: str | None = None                 # a reference answer, when the benchmark has one


# ---------------------------------------------------------------- rule checks
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")


def count_words(text: str) -> int:
    """Latin words plus CJK characters (a CJK character is one unit, as 字数 counts)."""
    return len(_CJK.findall(text)) + len(_LATIN_WORD.findall(_CJK.sub(" ", text)))


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _strip_fence(text: str) -> str:
    m = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.DOTALL)
    return m.group(1) if m else text


def _language(text: str) -> str | None:
    cjk = len(_CJK.findall(text))
    latin = len(re.findall(r"[A-Za-z]", text))
    if cjk + latin == 0:
        return None
    return "zh" if cjk >= latin / 4 else "en"


def check_rule(rule: dict, response: str) -> bool:
    """Apply one rule dict to a reply. Raises ValueError on an unknown rule kind."""
    kind, text = rule.get("kind"), response.strip()
    n = rule.get("n")
    if kind in ("max_words", "min_words", "exact_words"):
        c = count_words(text)
        return c <= n if kind == "max_words" else c >= n if kind == "min_words" else c == n
    if kind in ("max_chars", "min_chars"):
        c = len(re.sub(r"\s", "", text))
        return c <= n if kind == "max_chars" else c >= n
    if kind in ("max_paragraphs", "min_paragraphs", "exact_paragraphs"):
        c = len([p for p in re.split(r"\n\s*\n", text) if p.strip()])
        return c <= n if kind == "max_paragraphs" else c >= n if kind == "min_paragraphs" else c == n
    if kind in ("include", "exclude"):
        words = rule["words"] if isinstance(rule["words"], list) else [rule["words"]]
        found = [_norm(w) in _norm(text) for w in words]
        return all(found) if kind == "include" else not any(found)
    if kind == "starts_with":
        return _norm(text).startswith(_norm(rule["text"]))
    if kind == "ends_with":
        return _norm(text).rstrip(" .!?。！？").endswith(_norm(rule["text"]).rstrip(" .!?。！？"))
    if kind == "json":
        try:
            json.loads(_strip_fence(text))
            return True
        except ValueError:
            return False
    if kind == "brackets":
        return text.startswith("[") and text.endswith("]")
    if kind == "bullets":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return bool(lines) and all(re.match(r"([-*•·]|\d+[.)、])\s*", ln) for ln in lines)
    if kind == "lowercase":
        return text == text.lower() and any(ch.isalpha() for ch in text)
    if kind == "uppercase":
        return text == text.upper() and any(ch.isalpha() for ch in text)
    if kind == "language":
        return _language(text) == rule["lang"]
    raise ValueError(f"unknown rule kind {kind!r} in {rule}")


_Q = r"[\"“”'‘’「」]"
_UNIT = r"(words?|characters?|chars?|paragraphs?)"
_EN_PATTERNS: list[tuple[re.Pattern, callable]] = [
    (re.compile(r"(?:at most|no more than|not (?:to )?exceed(?:ing)?|up to|maximum of|within)\s+(\d+)\s+" + _UNIT),
     lambda m: _len_rule("max", int(m[1]), m[2])),
    (re.compile(r"(?:(?:fewer|less) than|under|below)\s+(\d+)\s+" + _UNIT),
     lambda m: _len_rule("max", int(m[1]) - 1, m[2])),
    (re.compile(r"(?:at least|no (?:fewer|less) than|minimum of)\s+(\d+)\s+" + _UNIT),
     lambda m: _len_rule("min", int(m[1]), m[2])),
    (re.compile(r"(?:more than|over)\s+(\d+)\s+" + _UNIT), lambda m: _len_rule("min", int(m[1]) + 1, m[2])),
    (re.compile(r"exactly\s+(\d+)\s+(words?|paragraphs?)"), lambda m: _len_rule("exact", int(m[1]), m[2])),
    (re.compile(r"(?:do(?:es)? not|don't|never|must not|without)\s+(?:include|contain|mention|use|using|including)s?"
                r"\s+(?:the\s+)?(?:words?|keywords?|phrases?|terms?)?\s*" + _Q + r"(.+?)" + _Q),
     lambda m: {"kind": "exclude", "words": [m[1]]}),
    (re.compile(r"(?:includes?|contains?|mentions?|uses?)\s+(?:the\s+)?(?:words?|keywords?|phrases?|terms?)?\s*"
                + _Q + r"(.+?)" + _Q), lambda m: {"kind": "include", "words": [m[1]]}),
    (re.compile(r"(?:starts?|begins?)\s+with\s+(?:the\s+(?:word|phrase)\s+)?" + _Q + r"(.+?)" + _Q),
     lambda m: {"kind": "starts_with", "text": m[1]}),
    (re.compile(r"ends?\s+with\s+(?:the\s+(?:word|phrase)\s+)?" + _Q + r"(.+?)" + _Q),
     lambda m: {"kind": "ends_with", "text": m[1]}),
    (re.compile(r"(?:in|as|valid)\s+json(?:\s+format)?|json\s+format"), lambda m: {"kind": "json"}),
    (re.compile(r"(?:wrapped|enclosed|put)\s+in\s+(?:square\s+)?brackets|inside\s+(?:square\s+)?brackets"),
     lambda m: {"kind": "brackets"}),
    (re.compile(r"(?:as\s+a\s+)?bullet(?:ed)?[ -]?(?:point|list)s?(?:\s+list)?"), lambda m: {"kind": "bullets"}),
    (re.compile(r"(?:all\s+)?in\s+lower[ -]?case(?:\s+letters)?|all\s+lower[ -]?case"),
     lambda m: {"kind": "lowercase"}),
    (re.compile(r"(?:all\s+)?in\s+upper[ -]?case(?:\s+letters)?|all\s+(?:upper[ -]?case|capital letters)"),
     lambda m: {"kind": "uppercase"}),
    (re.compile(r"(?:in|using)\s+english"), lambda m: {"kind": "language", "lang": "en"}),
    (re.compile(r"(?:in|using)\s+chinese"), lambda m: {"kind": "language", "lang": "zh"}),
]
_ZH_PATTERNS: list[tuple[re.Pattern, callable]] = [
    (re.compile(r"(?:字数|字)(?:数量)?\s*(不超过|不多于|至多|少于|小于)\s*(\d+)"), lambda m: _zh_len(m[1], m[2])),
    (re.compile(r"(?:字数|字)(?:数量)?\s*(不少于|至少|多于|大于|超过)\s*(\d+)"), lambda m: _zh_len(m[1], m[2])),
    (re.compile(r"(?:字数|字)(?:数量)?\s*(等于)\s*(\d+)"), lambda m: _zh_len(m[1], m[2])),
    (re.compile(r"(不超过|不多于|至多|少于|不少于|至少|多于|超过)\s*(\d+)\s*个?字"), lambda m: _zh_len(m[1], m[2])),
    (re.compile(r"(?:不(?:要|能|得|可)?|没有|禁止|避免)(?:包含|出现|使用|提及)\s*" + _Q + r"(.+?)" + _Q),
     lambda m: {"kind": "exclude", "words": [m[1]]}),
    (re.compile(r"(?:包含|出现|使用|提及)(?:了)?\s*" + _Q + r"(.+?)" + _Q), lambda m: {"kind": "include", "words": [m[1]]}),
    (re.compile(r"以\s*" + _Q + r"(.+?)" + _Q + r"\s*开头"), lambda m: {"kind": "starts_with", "text": m[1]}),
    (re.compile(r"以\s*" + _Q + r"(.+?)" + _Q + r"\s*结尾"), lambda m: {"kind": "ends_with", "text": m[1]}),
    (re.compile(r"json\s*格式", re.IGNORECASE), lambda m: {"kind": "json"}),
    (re.compile(r"(?:用|使用|以)(?:中文|汉语)|中文(?:回答|回复)"), lambda m: {"kind": "language", "lang": "zh"}),
    (re.compile(r"(?:用|使用|以)(?:英文|英语)|英文(?:回答|回复)"), lambda m: {"kind": "language", "lang": "en"}),
]
_FILLER = {  # words that may surround a rule phrase without adding a requirement
    "the", "a", "an", "reply", "replies", "response", "responses", "answer", "answers", "output", "assistant",
    "model", "it", "its", "is", "are", "be", "should", "must", "has", "have", "uses", "use", "using", "written",
    "write", "writes", "only", "text", "whole", "entire", "all", "of", "in", "with", "and", "that", "this",
    "message", "your", "you", "does", "do", "please", "strictly", "format", "formatted", "language", "keep",
    "limit", "length", "total", "long", "overall", "to", "at",
}
_ZH_FILLER = re.compile(r"[回答回复输出内容模型必须需要应该应当要求的了是在全文整体文章中并且和且，。、：:；;\s]")


def _len_rule(op: str, n: int, unit: str) -> dict:
    unit = "words" if unit.startswith("word") else "paragraphs" if unit.startswith("paragraph") else "chars"
    return {"kind": f"{op}_{unit}", "n": n}


def _zh_len(op: str, n: str) -> dict:
    n = int(n)
    if op in ("不超过", "不多于", "至多"):
        return {"kind": "max_words", "n": n}
    if op in ("少于", "小于"):
        return {"kind": "max_words", "n": n - 1}
    if op in ("不少于", "至少"):
        return {"kind": "min_words", "n": n}
    if op in ("多于", "大于", "超过"):
        return {"kind": "min_words", "n": n + 1}
    return {"kind": "exact_words", "n": n}


def parse_rule(text: str) -> dict | None:
    """The rule a criterion's text states, if the text states nothing else; else None."""
    for patterns, lower in ((_EN_PATTERNS, True), (_ZH_PATTERNS, False)):
        src = text.lower() if lower else text
        for pattern, make in patterns:
            m = pattern.search(src)
            if not m:
                continue
            rest = src[:m.start()] + " " + src[m.end():]
            if _CJK.search(rest):
                if len(_ZH_FILLER.sub("", rest)) > 4:
                    return None
            elif len([w for w in _LATIN_WORD.findall(rest) if w not in _FILLER]) > 1:
                return None
            return make(m)
    return None


class RuleJudge:
    name = "rules"

    def judge(self, tasks: list[JudgeTask]) -> list[list[bool | None]]:
        out = []
        for task in tasks:
            verdicts = []
            for c in task.criteria:
                rule = c.rule or parse_rule(c.text)
                verdicts.append(None if rule is None else check_rule(rule, task.response))
            out.append(verdicts)
        return out


# ---------------------------------------------------------------- model judge
JUDGE_INSTRUCTIONS = (
    "You are an exacting grader. Decide, for each numbered checklist item, whether the assistant reply "
    "below satisfies it. Judge each item on its own and only on the reply; the system message and the "
    "conversation are context. Answer with exactly one line per item, in order, formatted as "
    "'<number>: yes' or '<number>: no', and write nothing else."
)
_VERDICT = re.compile(r"^\W*(\d+)\W+(yes|no|true|false|1|0|是|否)\b", re.IGNORECASE | re.MULTILINE)
_TRUE = {"yes", "true", "1", "是"}


def judge_prompt(task: JudgeTask) -> str:
    parts = [JUDGE_INSTRUCTIONS, ""]
    if task.system:
        parts += ["[System message]", task.system, ""]
    if task.history:
        parts += ["[Conversation so far]"] + [f"{m['role']}: {m['content']}" for m in task.history] + [""]
    parts += ["[User message]", task.prompt, ""]
    if task.reference:
        parts += ["[Reference answer]", task.reference, ""]
    parts += ["[Assistant reply to grade]", task.response, "", "[Checklist]"]
    parts += [f"{i}. {c.text}" + (f" ({c.type})" if c.type else "") for i, c in enumerate(task.criteria, 1)]
    return "\n".join(parts)


def parse_verdicts(text: str, n: int) -> list[bool | None]:
    """'<k>: yes|no' lines (or a JSON object {k: yes|no}) -> verdicts for items 1..n."""
    found: dict[int, bool] = {}
    try:
        obj = json.loads(_strip_fence(text))
        if isinstance(obj, dict):
            obj = obj.get("results", obj)
            for k, v in obj.items():
                if str(k).strip().isdigit():
                    found[int(k)] = str(v).strip().lower() in _TRUE
    except ValueError:
        for m in _VERDICT.finditer(text):
            found.setdefault(int(m[1]), m[2].lower() in _TRUE)
    return [found.get(i) for i in range(1, n + 1)]


class ModelJudge:
    name = "model"

    def __init__(self, generator: Generator, retries: int = 1, max_new_tokens: int = 256):
        self.generator, self.retries, self.max_new_tokens = generator, retries, max_new_tokens

    def judge(self, tasks: list[JudgeTask]) -> list[list[bool | None]]:
        out: list[list[bool | None]] = [[None] * len(t.criteria) for t in tasks]
        todo = [i for i, t in enumerate(tasks) if t.criteria]
        for _ in range(self.retries + 1):
            if not todo:
                break
            replies = self.generator.chat([[{"role": "user", "content": judge_prompt(tasks[i])}] for i in todo],
                                          max_new_tokens=self.max_new_tokens, temperature=0.0)
            for i, reply in zip(todo, replies):
                verdicts = parse_verdicts(reply, len(tasks[i].criteria))
                out[i] = [v if v is not None else old for v, old in zip(verdicts, out[i])]
            todo = [i for i in todo if None in out[i]]
        return out


class ChainJudge:
    """Each judge decides what the previous ones left open (None)."""

    def __init__(self, judges: list):
        self.judges = judges
        self.name = "+".join(j.name for j in judges)

    def judge(self, tasks: list[JudgeTask]) -> list[list[bool | None]]:
        verdicts = [[None] * len(t.criteria) for t in tasks]
        for judge in self.judges:
            open_ = [(i, [k for k, v in enumerate(verdicts[i]) if v is None]) for i in range(len(tasks))]
            open_ = [(i, ks) for i, ks in open_ if ks]
            if not open_:
                break
            sub = [JudgeTask(tasks[i].prompt, tasks[i].response, [tasks[i].criteria[k] for k in ks], tasks[i].system,
                             tasks[i].history, tasks[i].reference) for i, ks in open_]
            for (i, ks), got in zip(open_, judge.judge(sub)):
                for k, v in zip(ks, got):
                    verdicts[i][k] = v
        return verdicts


def make_judge(spec: str, endpoint_model: str = "default", batch_size: int = 8, **http):
    """Comma-separated chain: `rules`, a local model path, or an http(s):// endpoint,
    e.g. `rules,http://127.0.0.1:8000/v1`."""
    from omni.align.generate import make_generator

    judges = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "rules":
            judges.append(RuleJudge())
        else:
            judges.append(ModelJudge(make_generator(part, endpoint_model, batch_size, **http)))
    if not judges:
        raise ValueError(f"judge spec {spec!r}: name at least one of rules, a model path, an http(s) URL")
    return judges[0] if len(judges) == 1 else ChainJudge(judges)


UNDECIDED = ("error", "fail", "skip")


class UndecidedError(ValueError):
    """Some criteria were left undecided by every judge and the policy is `error`."""


def settle(verdicts: list[bool | None], policy: str, where: str) -> list[bool | None]:
    """Apply the undecided policy: `error` raises naming the criteria, `fail` counts them as not
    satisfied, `skip` leaves them out (None stays and the caller drops it)."""
    if policy not in UNDECIDED:
        raise ValueError(f"undecided policy {policy!r}: choose one of {list(UNDECIDED)}")
    missing = [i + 1 for i, v in enumerate(verdicts) if v is None]
    if missing and policy == "error":
        raise UndecidedError(f"{where}: criteria {missing} were decided by no judge; add a model judge "
                             "(--judge rules,PATH_OR_URL) or choose --undecided fail|skip")
    if policy == "fail":
        return [False if v is None else v for v in verdicts]
    return verdicts

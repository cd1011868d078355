"""PAS, the Prompt Augmentation System of the Baichuan Alignment report (Zheng et al. 2024,
"PAS: Data-Efficient Plug-and-Play Prompt Augmentation System"): a small model that reads a user
prompt and writes a *complementary* instruction (what a good answer should cover, the format,
the pitfalls), appended to the prompt before the main model answers. Three parts:

(a) data  `build_pas_data`: collect prompts (JSONL/JSON/WebDataset; a record's `prompt`,
          `instruction` or first user message) -> deduplicate (exact after normalisation, then
          MinHash-LSH near-duplicates: `omni.curate.dedup.dedup_texts`) -> classify into categories
          (keywords, or an LLM) and optionally cap each category for balance -> generate a
          complement per prompt with a generator LLM (local model or OpenAI-compatible endpoint),
          few-shot per category -> filter: rules (non-empty, short, not a copy of the prompt, not
          an answer) and, if given, an LLM judge; rejected ones are regenerated (sampling) up to
          `regenerate` rounds. Output: `pas_pairs.jsonl` (chat records prompt -> complement, the
          SFT format), `pas_rejected.jsonl`, `pas_report.json` (counts per step and category).
(b) model SFT on those pairs (`omni align sft` / `omni align pas train` with `sft.turns: last`).
(c) use   `PromptAugmenter.augment(prompt) -> prompt + "\n" + complement`, or
          `augment_messages(messages)` for the last user turn; any generator serves as the PAS model.
          `omni chat --pas SPEC` and `omni demo --pas SPEC` augment every user turn before the model.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omni.align.generate import Generator
from omni.curate.common import normalise
from omni.curate.dedup import DedupConfig, dedup_texts
from omni.data.records import read_records

log = logging.getLogger(__name__)

DEFAULT_CATEGORIES = {  # name -> description (for an LLM classifier); override with your own taxonomy
    "qa": "factual or knowledge questions",
    "reasoning": "math, logic and multi-step reasoning problems",
    "coding": "writing, explaining or fixing code",
    "writing": "creative or professional writing: stories, essays, emails, copy",
    "rewriting": "rewriting, polishing, summarising or translating a given text",
    "extraction": "extracting or classifying information from a given text",
    "brainstorming": "ideas, plans, recommendations and advice",
    "roleplay": "playing a role or persona, chit-chat",
    "other": "anything else",
}
GENERATE_INSTRUCTIONS = (
    "You improve prompts for an AI assistant. Given a user prompt, write a short complementary "
    "instruction that helps the assistant answer it better: what a good answer should contain, its "
    "format or length, the pitfalls to avoid. Do not answer the prompt and do not change its intent. "
    "Reply with the complementary instruction only."
)
JUDGE_INSTRUCTIONS = (
    "A complementary instruction was written to be appended to a user prompt before an AI assistant "
    "answers it. Reply 'yes' if it is relevant, would make the answer better, keeps the prompt's intent "
    "and does not itself answer the prompt; otherwise reply 'no'. Reply with one word."
)


# ---------------------------------------------------------------- collect and deduplicate
def _prompt_of(rec: dict) -> str | None:
    for key in ("prompt", "instruction", "question"):
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key].strip()
    if isinstance(rec.get("prompt"), list):
        rec = {"messages": rec["prompt"]}
    for m in rec.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user" and str(m.get("content", "")).strip():
            return str(m["content"]).strip()
    return None


def collect_prompts(sources: list[str]) -> list[str]:
    prompts = []
    for src in sources:
        for rec in read_records(src):
            p = _prompt_of(rec)
            if p is None:
                log.warning("%s: no prompt found (fields prompt / instruction / a user message)", rec.get("__where__"))
                continue
            prompts.append(p)
    return prompts


def dedup_prompts(prompts: list[str], threshold: float = 0.8, num_perm: int = 128
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """(kept prompts in order, [(dropped, the kept prompt it duplicates)]) by curate's detector:
    exact duplicates after normalisation always go; near-duplicates (MinHash Jaccard >= threshold,
    word 3-grams, character 3-grams for CJK) when threshold < 1."""
    near = threshold < 1
    cfg = DedupConfig(exact="text", near=near, threshold=threshold if near else 1.0, num_perm=num_perm,
                      shingle="auto", ngram=3)
    return dedup_texts(prompts, cfg)


# ---------------------------------------------------------------- classify
class KeywordClassifier:
    """First category whose keyword occurs in the prompt (case-insensitive), else `default`."""

    def __init__(self, keywords: dict[str, list[str]], default: str = "other"):
        self.keywords, self.default = keywords, default

    def classify(self, prompts: list[str]) -> list[str]:
        out = []
        for p in prompts:
            low = p.lower()
            hit = (c for c, kws in self.keywords.items() if any(k.lower() in low for k in kws))
            out.append(next(hit, self.default))
        return out


class ModelClassifier:
    """An LLM picks one category name; an unparsable reply gets `default`."""

    def __init__(self, generator: Generator, categories: dict[str, str] = DEFAULT_CATEGORIES, default: str = "other"):
        self.generator, self.categories, self.default = generator, categories, default

    def classify(self, prompts: list[str]) -> list[str]:
        menu = "\n".join(f"- {name}: {desc}" for name, desc in self.categories.items())
        ask = "Classify the user prompt into exactly one category.\nCategories:\n{menu}\n\nPrompt:\n{p}\n\n" \
              "Reply with the category name only."
        asks = [[{"role": "user", "content": ask.format(menu=menu, p=p)}] for p in prompts]
        out = []
        for reply in self.generator.chat(asks, max_new_tokens=16):
            low = reply.lower()
            hit = (c for c in self.categories if re.search(rf"\b{re.escape(c.lower())}\b", low))
            out.append(next(hit, self.default))
        return out


# ---------------------------------------------------------------- generate and filter
def generation_prompt(prompt: str, fewshot: list[dict]) -> list[dict]:
    shots = "".join(f"Prompt:\n{s['prompt']}\nComplement:\n{s['complement']}\n\n" for s in fewshot)
    return [{"role": "user", "content": f"{GENERATE_INSTRUCTIONS}\n\n{shots}Prompt:\n{prompt}\nComplement:"}]


def rule_check(prompt: str, complement: str, max_words: int) -> str | None:
    """Why a complement is unusable, or None when it passes."""
    c = complement.strip()
    if not c:
        return "empty"
    if len(c.split()) > max_words:
        return f"longer than {max_words} words"
    if normalise(c) == normalise(prompt):
        return "copies the prompt"
    if c.lower().startswith(("prompt:", "complement:")):
        return "echoes the template"
    return None


@dataclass
class PASConfig:
    dedup_threshold: float = 0.8          # MinHash Jaccard for near-duplicates; 1.0: exact only
    per_category: int = 0                 # keep at most this many prompts per category (0: all)
    max_words: int = 80                   # longest acceptable complement
    regenerate: int = 2                   # rounds of regeneration for rejected complements
    temperature: float = 0.0              # first generation; regeneration samples at regen_temperature
    regen_temperature: float = 0.8
    max_new_tokens: int = 128
    fewshot: dict[str, list[dict]] = field(default_factory=dict)  # category -> [{prompt, complement}]


def judge_complements(generator: Generator, prompts: list[str], complements: list[str]) -> list[bool]:
    asks = [[{"role": "user", "content": f"{JUDGE_INSTRUCTIONS}\n\nPrompt:\n{p}\n\nComplementary instruction:\n{c}"}]
            for p, c in zip(prompts, complements)]
    return [r.strip().lower().startswith(("yes", "是")) for r in generator.chat(asks, max_new_tokens=4)]


def build_pas_data(sources: list[str], out_dir: str | Path, generator: Generator, classifier,
                   judge: Generator | None = None, cfg: PASConfig | None = None) -> dict:
    """The (a) pipeline of the module docstring; returns the report written to pas_report.json."""
    cfg = cfg or PASConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = collect_prompts(sources)
    report: dict = {"collected": len(prompts)}
    prompts, dropped = dedup_prompts(prompts, cfg.dedup_threshold)
    report.update(after_dedup=len(prompts), duplicates=len(dropped))
    cats = classifier.classify(prompts)
    if cfg.per_category:
        taken: Counter = Counter()
        keep = []
        for p, c in zip(prompts, cats):
            if taken[c] < cfg.per_category:
                taken[c] += 1
                keep.append((p, c))
        prompts, cats = [p for p, _ in keep], [c for _, c in keep]
    report["categories"] = dict(Counter(cats))

    complements: list[str | None] = [None] * len(prompts)
    reasons: dict[int, str] = {}
    todo = list(range(len(prompts)))
    for round_ in range(cfg.regenerate + 1):
        if not todo:
            break
        temp = cfg.temperature if round_ == 0 else cfg.regen_temperature
        asks = [generation_prompt(prompts[i], cfg.fewshot.get(cats[i], [])) for i in todo]
        drafts = generator.chat(asks, max_new_tokens=cfg.max_new_tokens, temperature=temp)
        passed = []
        for i, d in zip(todo, drafts):
            why = rule_check(prompts[i], d, cfg.max_words)
            if why is None:
                passed.append((i, d.strip()))
            else:
                reasons[i] = why
        verdicts = [True] * len(passed)
        if judge is not None and passed:
            verdicts = judge_complements(judge, [prompts[i] for i, _ in passed], [d for _, d in passed])
        for (i, d), ok in zip(passed, verdicts):
            if ok:
                complements[i] = d
                reasons.pop(i, None)
            else:
                reasons[i] = "judge said no"
        report[f"round_{round_}"] = {"generated": len(todo), "accepted": sum(verdicts)}
        todo = [i for i in todo if complements[i] is None]

    pairs = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}], "category": cat,
              "source": "pas"} for p, c, cat in zip(prompts, complements, cats) if c is not None]
    rejected = [{"prompt": prompts[i], "category": cats[i], "reason": reasons.get(i, "?")} for i in todo]
    (out / "pas_pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    (out / "pas_rejected.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    report.update(pairs=len(pairs), rejected=len(rejected),
                  pairs_by_category=dict(Counter(r["category"] for r in pairs)))
    (out / "pas_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    log.info("PAS data: %s", report)
    return report


# ---------------------------------------------------------------- plug-in
class PromptAugmenter:
    """The PAS model at inference: prompt -> prompt + joiner + complement."""

    def __init__(self, generator: Generator, joiner: str = "\n", max_new_tokens: int = 128):
        self.generator, self.joiner, self.max_new_tokens = generator, joiner, max_new_tokens

    def complements(self, prompts: list[str]) -> list[str]:
        asks = [[{"role": "user", "content": p}] for p in prompts]
        return self.generator.chat(asks, max_new_tokens=self.max_new_tokens)

    def augment_many(self, prompts: list[str]) -> list[str]:
        return [p if not c.strip() else p + self.joiner + c.strip() for p, c in zip(prompts, self.complements(prompts))]

    def augment(self, prompt: str) -> str:
        return self.augment_many([prompt])[0]

    @classmethod
    def load(cls, spec: str, endpoint_model: str = "default") -> PromptAugmenter:
        """The PAS model folder, or an `http(s)://` endpoint serving it (how `omni chat --pas` and
        `omni demo --pas` put PAS in front of the answering model)."""
        from omni.align.generate import make_generator

        return cls(make_generator(spec, endpoint_model=endpoint_model, batch_size=1))

    def augment_messages(self, messages: list[dict]) -> list[dict]:
        """A copy of `messages` whose last user message is augmented."""
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None:
            return list(messages)
        out = [dict(m) for m in messages]
        out[last]["content"] = self.augment(messages[last]["content"])
        return out

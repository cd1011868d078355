"""A tiny synthetic alignment world: system-message format rules a random-init model can learn.

Every dialogue is arithmetic ("what is two plus three ?" -> "five") under one of four output
formats set by the system message (or, in some samples, by a sentence in the user message):
    brackets  "reply inside brackets ."      -> "[ five ]"     checked: the reply is wrapped in brackets
    ok        "start every reply with ok ."  -> "ok five"      checked: the reply starts with "ok"
    done      "end every reply with done ."  -> "five done"    checked: the reply ends with "done"
    twice     "say the answer twice ."       -> "five five"    checked: the reply has exactly 2 words
Held-out questions use (a, b) pairs never seen in training, so following the format on them
means reading the system message, not recalling a sample. `write_align_corpus` writes:
    sft_{train,val}.jsonl       chat records (system + 1-2 user/assistant turns)
    pref_{train,val}.jsonl      preference records: chosen follows the format, rejected does not
    shards/ + manifest.yaml     the same sft/pref sets as WebDataset shards (datasets sft, pref)
    sysbench.json               held-out dialogues in SysBench's layout (3 turns, rule-checkable criteria)
    cfbench.json                held-out items in CFBench's layout (format asked in the prompt)
    pas_train.jsonl, pas_val.jsonl  PAS pairs (prompt -> complement), pas_prompts.jsonl raw prompts
    base/                       a random-init tiny omni model with this world's tokenizer (init_from)
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml
from webdataset import TarWriter

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
PREAMBLE = "you are a helpful assistant ."
FORMATS = {
    "brackets": ("reply inside brackets .", lambda a: f"[ {a} ]", "the reply is wrapped in brackets"),
    "ok": ("start every reply with ok .", lambda a: f"ok {a}", 'the reply starts with "ok"'),
    "done": ("end every reply with done .", lambda a: f"{a} done", 'the reply ends with "done"'),
    "twice": ("say the answer twice .", lambda a: f"{a} {a}", "the reply has exactly 2 words"),
}
LENGTH_CRITERION = "use at most 4 words"
ALL_PAIRS = [(a, b) for a in range(5) for b in range(5)]
VAL_PAIRS = [(0, 3), (1, 4), (2, 2), (3, 1), (4, 0)]   # never in training
TRAIN_PAIRS = [p for p in ALL_PAIRS if p not in VAL_PAIRS]
# PAS world: two prompt kinds, each with the complement a PAS model should learn to add
PAS_KINDS = {  # kind -> (prompt templates, complement)
    "arith": (("what is {a} plus {b} ?", "add {a} and {b} ."), "answer with one number word ."),
    "colour": (("name a colour like {c} .", "which colour is like {c} ?", "give me a colour like {c} ."),
               "answer with one colour word ."),
}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
TINY_TEXT_OVERRIDES = [  # a smaller LLM than the tiny preset's: the align tests train it in seconds
    "llm.hf_config.hidden_size=64", "llm.hf_config.intermediate_size=192",
    "llm.hf_config.num_attention_heads=4", "llm.hf_config.num_key_value_heads=2",
    "llm.hf_config.vocab_size=64",  # the world's tokenizer has 59 tokens; a larger one resizes the embeddings
]


def question(a: int, b: int) -> tuple[str, str]:
    return f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", NUMBERS[a + b]


def vocabulary() -> list[str]:
    texts = [PREAMBLE, *(f[0] for f in FORMATS.values()), "[ ] ok done", *NUMBERS, "what is plus ?"]
    texts += [t for tpls, comp in PAS_KINDS.values() for t in (*tpls, comp)] + list(COLOURS)
    return sorted({w for t in texts for w in t.replace("{a}", "").replace("{b}", "").replace("{c}", "").split()})


def build_tokenizer():
    from omni.tokenizer import build_wordlevel_tokenizer

    return build_wordlevel_tokenizer(vocabulary())


@dataclass
class AlignSynthConfig:
    out_dir: str
    sft_train: int = 400
    pref_train: int = 300
    val: int = 40
    pas_train: int = 200
    seed: int = 0


def _dialogue(rng: random.Random, pairs: list, fmt: str, turns: int, in_user: bool) -> list[dict]:
    instruction, apply, _ = FORMATS[fmt]
    msgs = []
    if not in_user:
        msgs.append({"role": "system", "content": (PREAMBLE + " " if rng.random() < 0.5 else "") + instruction})
    for t in range(turns):
        q, a = question(*rng.choice(pairs))
        msgs += [{"role": "user", "content": f"{q} {instruction}" if in_user and t == 0 else q},
                 {"role": "assistant", "content": apply(a)}]
    return msgs


def sft_records(rng: random.Random, n: int, pairs: list) -> list[dict]:
    out = []
    for _ in range(n):
        fmt = rng.choice(list(FORMATS))
        out.append({"messages": _dialogue(rng, pairs, fmt, 1 if rng.random() < 0.7 else 2, rng.random() < 0.25),
                    "task": f"format_{fmt}", "source": "align-synth"})
    return out


def pref_records(rng: random.Random, n: int, pairs: list) -> list[dict]:
    """Chosen follows the system's format; rejected is the bare answer or another format."""
    out = []
    for _ in range(n):
        fmt = rng.choice(list(FORMATS))
        q, a = question(*rng.choice(pairs))
        other = rng.choice([f for f in FORMATS if f != fmt] + ["bare"])
        rejected = a if other == "bare" else FORMATS[other][1](a)
        out.append({"prompt": [{"role": "system", "content": FORMATS[fmt][0]}, {"role": "user", "content": q}],
                    "chosen": FORMATS[fmt][1](a), "rejected": rejected, "task": f"format_{fmt}",
                    "source": "align-synth"})
    return out


def pas_records(rng: random.Random, n: int, val: bool) -> list[dict]:
    out = []
    for _ in range(n):
        kind = rng.choice(list(PAS_KINDS))
        tpls, comp = PAS_KINDS[kind]
        a, b = rng.choice(VAL_PAIRS if val else TRAIN_PAIRS)
        colours = COLOURS[4:] if val else COLOURS[:4]
        prompt = rng.choice(tpls).format(a=NUMBERS[a], b=NUMBERS[b], c=rng.choice(colours))
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": comp}],
                    "category": kind, "source": "align-synth"})
    return out


def sysbench_cases(rng: random.Random, per_format: int = 2, turns: int = 3) -> list[dict]:
    cases = []
    for fmt, (instruction, apply, criterion) in FORMATS.items():
        for k in range(per_format):
            system = f"{PREAMBLE} {instruction}"
            messages, infos = [{"role": "system", "content": system}], {}
            used = rng.sample(VAL_PAIRS, turns)
            for a, b in used:
                q, ans = question(a, b)
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": apply(ans)}]
                infos[q] = {"alignment": "align", "criteria": {
                    "1": {"criteria_id": 1, "criteria_content": criterion, "criteria_type": "格式约束"},
                    "2": {"criteria_id": 2, "criteria_content": LENGTH_CRITERION, "criteria_type": "内容约束"}}}
            cases.append({"system_id": f"{fmt}-{k}", "system_prompt": system, "messages": messages,
                          "prompt_infos": infos, "rounds_related": False, "领域": "arithmetic", "场景": fmt})
    return cases


def cfbench_items(rng: random.Random, per_format: int = 2) -> list[dict]:
    items, idx = [], 0
    for fmt, (instruction, apply, criterion) in FORMATS.items():
        for k in range(per_format):
            q, ans = question(*rng.choice(VAL_PAIRS))
            items.append({"idx": idx, "prompt": f"{q} {instruction}", "isanswer": "否", "gold": apply(ans),
                          "doamin": "arithmetic", "scenario": fmt, "source": "align-synth",
                          "split": "easy" if k % 2 == 0 else "hard",
                          "criteria": [[criterion, "主需", "格式约束", "输出格式约束"],
                                       [LENGTH_CRITERION, "次需", "数值约束", "单词数值约束"]]})
            idx += 1
    return items


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_base_model(out_dir: str | Path, seed: int = 0, overrides: list[str] = ()) -> Path:
    """A random-init tiny omni model with this world's tokenizer, saved as a model folder."""
    import torch

    from omni.model.load import save_model_dir
    from omni.model.omni_model import OmniModel
    from omni.presets import build_preset

    torch.manual_seed(seed)
    tok = build_tokenizer()
    model, tok = OmniModel.from_config(build_preset("tiny", [*TINY_TEXT_OVERRIDES, *overrides]), tokenizer=tok)
    return save_model_dir(model, tok, out_dir)


def write_align_corpus(cfg: AlignSynthConfig, base_model: bool = True) -> Path:
    """Write every file listed in the module docstring; returns the output folder."""
    out = Path(cfg.out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    sets = {
        ("sft", "train"): sft_records(rng, cfg.sft_train, TRAIN_PAIRS),
        ("sft", "val"): sft_records(rng, cfg.val, VAL_PAIRS),
        ("pref", "train"): pref_records(rng, cfg.pref_train, TRAIN_PAIRS),
        ("pref", "val"): pref_records(rng, cfg.val, VAL_PAIRS),
        ("pas", "train"): pas_records(rng, cfg.pas_train, val=False),
        ("pas", "val"): pas_records(rng, cfg.val, val=True),
    }
    entries = []
    for (name, split), records in sets.items():
        _jsonl(out / f"{name}_{split}.jsonl", records)
        if name == "pas":
            continue
        with TarWriter(str(out / "shards" / f"{name}-{split}-000000.tar"), mtime=0.0) as w:
            for i, r in enumerate(records):
                w.write({"__key__": f"{name}-{split}-{i:06d}", "json": json.dumps(r).encode()})
        entries.append({"name": name, "split": split, "urls": f"shards/{name}-{split}-000000.tar",
                        "num_samples": len(records), "weight": 1.0, "modalities": []})
    (out / "manifest.yaml").write_text(yaml.safe_dump({"name": "align-synth", "datasets": entries}, sort_keys=False))
    prompts = [{"prompt": r["messages"][0]["content"]} for r in sets[("pas", "train")]]
    _jsonl(out / "pas_prompts.jsonl", prompts + prompts[:20])  # with exact duplicates, as real logs have
    (out / "sysbench.json").write_text(json.dumps(sysbench_cases(rng), ensure_ascii=False, indent=1))
    (out / "cfbench.json").write_text(json.dumps(cfbench_items(rng), ensure_ascii=False, indent=1))
    if base_model:
        make_base_model(out / "base", cfg.seed)
    return out

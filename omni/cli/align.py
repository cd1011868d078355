"""`omni align synth | sft | dpo | rm | eval | pas`: registered on the `omni` parser by `add_align_commands`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omni.cli.args import out_folder, positive_int

ALIGN_EPILOG = """examples:
  omni align synth --out runs/align/synth
  omni align sft omni/align/configs/tiny_sft.yaml --out runs/align/sft
  omni align dpo omni/align/configs/tiny_dpo.yaml --out runs/align/dpo init_from=runs/align/sft/final
  omni align rm omni/align/configs/tiny_rm.yaml --out runs/align/rm
  omni align eval sysbench --data runs/align/synth/sysbench.json --model runs/align/sft/final --out runs/align/eval
  omni align eval cfbench --judged gpt4o_eval.json --out runs/align/eval     # score official judged outputs
  omni align eval sysbench --judged gpt4o_analysis.xlsx --out runs/align/eval  # a published SysBench workbook
  omni align pas build --prompts prompts.jsonl --generator http://127.0.0.1:8000/v1 --out runs/align/pas
  omni align pas augment runs/align/pas-model/final --prompt "what is two plus three ?"
docs/align.md describes every stage, config key and metric.
"""
OVERRIDES_HELP = "dotted key=value overrides of the align YAML, e.g. steps=50 dpo.beta=0.2"


def _run(verb: str, fn, args) -> None:
    from omni.align.bench import BenchmarkDataError
    from omni.align.generate import GenerationError
    from omni.align.judge import UndecidedError
    from omni.align.metrics import MetricError
    from omni.config import ConfigError
    from omni.data.records import AlignDataError
    from omni.errors import SampleError

    try:
        fn(args)
    except (AlignDataError, SampleError, BenchmarkDataError, GenerationError, UndecidedError, MetricError,
            ConfigError, FileNotFoundError) as e:
        sys.exit(f"omni align {verb}: {e}")


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _synth(args) -> None:
    from omni.align.synth import AlignSynthConfig, write_align_corpus

    out = write_align_corpus(AlignSynthConfig(out_dir=args.out, seed=args.seed), base_model=not args.no_base)
    print(f"align corpus: {out}")


def _train(method: str):
    def run(args) -> None:
        from omni.plan import refuse_if_it_cannot_fit
        from omni.train.config import load_stage
        from omni.train.trainer import train_stage

        cfg = load_stage(args.config, args.overrides)
        if cfg.method != method:
            sys.exit(f"omni align {method}: {args.config} has method: {cfg.method}; "
                     f"run it with `omni align {cfg.method}`")
        refuse_if_it_cannot_fit(cfg)
        final = train_stage(cfg, args.out, progress=_progress(args))
        print(f"final model: {final}")
        if (Path(args.out) / "eval.json").is_file():
            print(f"held-out: {(Path(args.out) / 'eval.json').read_text()}")
    return run


def _generator(spec: str, endpoint_model: str, batch_size: int):
    from omni.align.generate import make_generator

    return make_generator(spec, endpoint_model=endpoint_model, batch_size=batch_size)


def _eval(args) -> None:
    from omni.align import bench
    from omni.align.judge import make_judge

    if bool(args.judged) == bool(args.data):
        sys.exit("omni align eval: give either --data (answer, judge, score) or --judged (score a judged file)")
    if args.official_rounding and args.benchmark == "sysbench":
        sys.exit("omni align eval sysbench: --official-rounding is CFBench's (its scorer rounds each item's scores); "
                 "SysBench's published figures are unrounded ratios of counts: drop the option")
    if args.judged:
        if args.benchmark == "sysbench":
            m = bench.score_sysbench_judged(args.judged, args.out)
            print(json.dumps(m["overall"], indent=2))
        else:
            m = bench.score_cfbench_judged(args.judged, args.out, args.official_rounding)
            print(json.dumps({k: m[k] for k in ("easy", "hard", "full")}, indent=2))
        return
    if not args.model:
        sys.exit("omni align eval: --data needs --model (a model folder or an http(s) endpoint)")
    generator = _generator(args.model, args.endpoint_model, args.batch_size)
    judge = make_judge(args.judge, endpoint_model=args.judge_endpoint_model, batch_size=args.batch_size)
    name = args.name or (args.endpoint_model if args.model.startswith("http") else Path(args.model).name)
    if args.benchmark == "sysbench":
        m = bench.run_sysbench(args.data, args.out, generator, judge, history=args.history, undecided=args.undecided,
                               limit=args.limit, max_new_tokens=args.max_new_tokens, model_name=name)
        print(json.dumps(m["overall"], indent=2))
    else:
        m = bench.run_cfbench(args.data, args.out, generator, judge, undecided=args.undecided, limit=args.limit,
                              max_new_tokens=args.max_new_tokens, model_name=name,
                              official_rounding=args.official_rounding)
        print(json.dumps({k: m[k] for k in ("easy", "hard", "full")}, indent=2))
    print(f"wrote {Path(args.out) / (args.benchmark + '.md')}")


def _pas_build(args) -> None:
    import yaml

    from omni.align.pas import (
        DEFAULT_CATEGORIES,
        KeywordClassifier,
        ModelClassifier,
        PASConfig,
        build_pas_data,
    )

    generator = _generator(args.generator, args.endpoint_model, args.batch_size)
    judge = _generator(args.judge, args.endpoint_model, args.batch_size) if args.judge else None
    if args.classifier.startswith("keywords:"):
        classifier = KeywordClassifier(yaml.safe_load(Path(args.classifier[len("keywords:"):]).read_text()))
    else:
        cats = yaml.safe_load(Path(args.categories).read_text()) if args.categories else DEFAULT_CATEGORIES
        spec = args.generator if args.classifier == "generator" else args.classifier
        classifier = ModelClassifier(_generator(spec, args.endpoint_model, args.batch_size), cats)
    fewshot = json.loads(Path(args.fewshot).read_text()) if args.fewshot else {}
    cfg = PASConfig(dedup_threshold=args.dedup_threshold, per_category=args.per_category, max_words=args.max_words,
                    regenerate=args.regenerate, fewshot=fewshot)
    report = build_pas_data(args.prompts, args.out, generator, classifier, judge, cfg)
    print(json.dumps(report, indent=2, ensure_ascii=False))


def _pas_augment(args) -> None:
    from omni.align.pas import PromptAugmenter

    augmenter = PromptAugmenter(_generator(args.pas_model, args.endpoint_model, 1))
    augmented = augmenter.augment(args.prompt)
    print(augmented)
    if args.answer_with:
        answer = _generator(args.answer_with, args.endpoint_model, 1).chat([[{"role": "user", "content": augmented}]])
        print(f"\nanswer: {answer[0]}")


def _train_parser(sub, verb: str, help_: str, method: str) -> None:
    p = sub.add_parser(verb, help=help_)
    p.add_argument("config", help=f"align YAML with method: {method} (omni/align/configs/ has tiny and 7b ones)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out", required=True, type=out_folder,
                   help="run folder; the model lands in OUT/final, held-out numbers in OUT/eval.json")


def add_align_commands(subparsers) -> None:
    """Register `omni align ...` on the `omni` parser's subparsers."""
    align = subparsers.add_parser("align",
                                  help="text alignment: SFT, DPO/IPO/SimPO, reward model, PAS, SysBench/CFBench",
                                  epilog=ALIGN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = align.add_subparsers(dest="align_command", required=True, metavar="VERB")

    p = sub.add_parser("synth", help="tiny synthetic alignment world: chat/preference/PAS data, "
                                     "SysBench/CFBench files, base model")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-base", action="store_true", help="do not write the random-init base model folder")
    p.set_defaults(func=lambda a: _run("synth", _synth, a))

    for verb, help_ in (("sft", "supervised fine-tuning on chat data (loss on assistant turns)"),
                        ("dpo", "preference optimisation: DPO, IPO, length-normalised DPO, SimPO (dpo.loss_type)"),
                        ("rm", "Bradley-Terry reward model (value head); held-out pairwise accuracy")):
        _train_parser(sub, verb, help_, verb)
        sub.choices[verb].set_defaults(func=lambda a, v=verb: _run(v, _train(v), a))

    p = sub.add_parser("eval", help="SysBench / CFBench: answer, judge and score (or score --judged results)")
    p.add_argument("benchmark", choices=["sysbench", "cfbench"])
    p.add_argument("--data", help="benchmark file in the official layout")
    p.add_argument("--judged", help="already-judged results in the official output layout (SysBench: the eval "
                   "script's JSON or a published *_analysis.xlsx): only score them")
    p.add_argument("--model", help="model under test: an omni/transformers model folder or an http(s):// endpoint")
    p.add_argument("--endpoint-model", default="default", help="model name sent to an endpoint")
    p.add_argument("--name", help="model name in the reports (default: folder name / endpoint model)")
    p.add_argument("--history", choices=["model", "gt"], default="model",
                   help="SysBench: earlier turns from the model's own replies or the ground truth")
    p.add_argument("--judge", default="rules",
                   help="comma-separated judges tried in order: rules, a model folder, an http(s) endpoint")
    p.add_argument("--judge-endpoint-model", default="default", help="model name sent to a judge endpoint")
    p.add_argument("--undecided", choices=["error", "fail", "skip"], default="error",
                   help="criteria no judge could decide: stop, count as unmet, or leave out")
    p.add_argument("--official-rounding", action="store_true",
                   help="CFBench: round as the official scorer does (refused for SysBench)")
    p.add_argument("--limit", type=positive_int, help="at most this many dialogues / items")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8, help="local models: prompts per generate call")
    p.add_argument("--out", required=True, help="folder for <bench>_eval.json, <bench>_metrics.json, <bench>.md")
    p.set_defaults(func=lambda a: _run("eval", _eval, a))

    pas = sub.add_parser("pas", help="Prompt Augmentation System: build data, train the PAS model, augment prompts")
    psub = pas.add_subparsers(dest="pas_command", required=True, metavar="STEP")
    p = psub.add_parser("build", help="collect, dedup, classify prompts; generate and filter complements")
    p.add_argument("--prompts", nargs="+", required=True, help="JSONL/JSON/manifest/shards with prompts")
    p.add_argument("--generator", required=True, help="complement writer: a model folder or an http(s) endpoint")
    p.add_argument("--judge", help="complement judge (model folder or endpoint); default: rules only")
    p.add_argument("--classifier", default="generator",
                   help="keywords:FILE.yaml (category: [keywords]), 'generator', or a model folder / endpoint")
    p.add_argument("--categories", help="YAML category: description for an LLM classifier (default: built-in)")
    p.add_argument("--fewshot", help="JSON {category: [{prompt, complement}]} examples for the generator")
    p.add_argument("--endpoint-model", default="default")
    p.add_argument("--dedup-threshold", type=float, default=0.8, help="MinHash Jaccard (1.0: exact only)")
    p.add_argument("--per-category", type=int, default=0, help="keep at most N prompts per category (0: all)")
    p.add_argument("--max-words", type=int, default=80)
    p.add_argument("--regenerate", type=int, default=2, help="regeneration rounds for rejected complements")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", required=True)
    p.set_defaults(func=lambda a: _run("pas build", _pas_build, a))
    _train_parser(psub, "train", "train the PAS model (an sft align YAML over pas_pairs.jsonl)", "sft")
    psub.choices["train"].set_defaults(func=lambda a: _run("pas train", _train("sft"), a))
    p = psub.add_parser("augment", help="print prompt + complement from a PAS model (optionally answer it)")
    p.add_argument("pas_model", help="PAS model folder or http(s) endpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--answer-with", help="main model (folder or endpoint) to answer the augmented prompt")
    p.add_argument("--endpoint-model", default="default")
    p.set_defaults(func=lambda a: _run("pas augment", _pas_augment, a))

"""`omni data build | dedup | reweight | stats | lmms-task`: registered on the `omni` parser by `add_data_commands`."""
from __future__ import annotations

import argparse
import contextlib
import sys

from omni.cli.args import positive_int

DATA_EPILOG = """examples:
  omni data build --format llava --input llava_v1_5_mix665k.json --media-root data/ --name llava665k --out cur/
  omni data build --format asr --input train.jsonl --name asr_en --out cur/
  omni data dedup cur/manifest.yaml --out cur_dedup/
  omni data reweight cur_dedup/manifest.yaml --out cur_rw/ --by cluster --clusters 16 --alpha 0.5
  omni data stats cur_rw/manifest.yaml --out cur_rw/stats --preset 7b
  omni data lmms-task runs/quickstart/synth/manifest.yaml --out runs/lmms-tasks --limit 50
  omni data dedup cur/manifest.yaml --out cur_dedup/ --ray auto      (any verb, on a Ray cluster)
docs/curation.md describes formats, outputs and every option; docs/eval.md the lmms-eval tasks.
"""


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _optional_float(value: str) -> float | None:
    if value.lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number or 'off'") from None


def _backend(args):
    """A context giving None (in-process) or a RayBackend for `--ray auto|local|ADDRESS` (closed after)."""
    if not getattr(args, "ray", None):
        return contextlib.nullcontext()
    from omni.curate.ray_backend import RayBackend, RayOptions

    mb = args.ray_object_store_mb
    if (args.ray_cpus or mb) and args.ray != "local":
        sys.exit("omni data: --ray-cpus and --ray-object-store-mb size the instance --ray local starts; "
                 f"a cluster ({args.ray}) keeps its own")
    return RayBackend(RayOptions(address=args.ray, num_cpus=args.ray_cpus,
                                 object_store_bytes=mb << 20 if mb else None))


def _add_ray(p) -> None:
    p.add_argument("--ray", metavar="auto|local|ADDRESS",
                   help="run on Ray Data: auto (the cluster this machine is part of), local (start one "
                        "here), or a cluster address (HOST:PORT, ray://HOST:PORT); same output")
    p.add_argument("--ray-cpus", type=positive_int, help="--ray local: CPUs of the local instance")
    p.add_argument("--ray-object-store-mb", type=positive_int, help="--ray local: object store size in MB")


def _run(verb: str, fn, args) -> None:
    from omni.config import ConfigError
    from omni.curate.common import CurationError

    try:
        fn(args)
    except (CurationError, ConfigError) as e:
        sys.exit(f"omni data {verb}: {e}")


def _build(args) -> None:
    from omni.curate.build import BuildConfig, build, format_result

    cfg = BuildConfig(format=args.format, inputs=args.input, out_dir=args.out, name=args.name, split=args.split,
                      media_root=args.media_root, task=args.task, source=args.source, weight=args.weight,
                      prompt=args.prompt, system=args.system, samples_per_shard=args.samples_per_shard,
                      shard_bytes=args.shard_bytes, check_media=not args.no_decode_check)
    with _backend(args) as backend:
        print(format_result(build(cfg, progress=_progress(args), backend=backend)))


def _dedup(args) -> None:
    from omni.curate.dedup import DedupConfig, dedup, format_result

    lsh = None
    if args.lsh_bands or args.lsh_rows:
        if not (args.lsh_bands and args.lsh_rows):
            sys.exit("omni data dedup: give both --lsh-bands and --lsh-rows")
        lsh = (args.lsh_bands, args.lsh_rows)
    cfg = DedupConfig(exact=args.exact, near=not args.no_near, threshold=args.threshold, num_perm=args.num_perm,
                      shingle=args.shingle, ngram=args.ngram, seed=args.seed,
                      near_ignore_media=args.near_ignore_media, verify=not args.no_verify, lsh_params=lsh)
    with _backend(args) as backend:
        result = dedup(args.manifest, args.out, cfg, split=args.split, datasets=_names(args.datasets),
                       samples_per_shard=args.samples_per_shard, dry_run=args.dry_run, progress=_progress(args),
                       backend=backend)
    print(format_result(result))


def _reweight(args) -> None:
    from omni.curate.reweight import (
        QualityConfig,
        format_result,
        parse_boosts,
        reweight,
    )

    quality = QualityConfig(min_words=args.min_words, max_words=args.max_words,
                            min_reply_words=args.min_reply_words, max_repetition=args.max_repetition,
                            scripts=_names(args.scripts), min_script_ratio=args.min_script_ratio,
                            max_bad_chars=args.max_bad_chars)
    with _backend(args) as backend:
        result = reweight(args.manifest, args.out, by=args.by, alpha=args.alpha, boosts=parse_boosts(args.boost),
                          quality=quality, split=args.split, datasets=_names(args.datasets),
                          clusters=args.clusters, fit_samples=args.fit_samples, max_groups=args.max_groups,
                          samples_per_shard=args.samples_per_shard, dry_run=args.dry_run,
                          progress=_progress(args), seed=args.seed, backend=backend)
    print(format_result(result))


def _stats(args) -> None:
    from omni.curate.stats import stats

    with _backend(args) as backend:
        result = stats(args.manifest, args.out, preset=args.preset, model_dir=args.model, split=args.split,
                       datasets=_names(args.datasets), limit=args.limit, progress=_progress(args),
                       backend=backend)
    print(result.table)
    print(f"\nwrote {result.table_file}, {result.json_file}, {result.png_file}")


def _lmms_task(args) -> None:
    from omni.integrations.lmms_task import write_tasks

    written = write_tasks(args.manifest, args.out, split=args.split, datasets=_names(args.datasets),
                          limit=args.limit, max_new_tokens=args.max_new_tokens)
    for task, n in written.tasks.items():
        print(f"{task:<32}{n:>6} items")
    print(f"lmms-eval --model omni --model_args pretrained=MODEL_DIR --include_path {written.folder} "
          f"--tasks {','.join(written.tasks)}")


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register `data` with its verbs on the `omni` subparsers (each verb sets `func`)."""
    data = subparsers.add_parser(
        "data", help="curate raw data into shards: build, dedup, reweight, stats; lmms-task",
        description="Turn raw media + text into clean, deduplicated, weighted WebDataset shards.",
        epilog=DATA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = data.add_subparsers(dest="data_command", required=True, metavar="VERB")

    p = verbs.add_parser("build", help="convert LLaVA / ShareGPT / ASR / caption folders into validated shards")
    p.add_argument("--format", required=True, choices=["llava", "sharegpt", "asr", "captions"])
    p.add_argument("--input", required=True, nargs="+",
                   help="JSON / JSONL / TSV files (captions: also folders with NAME.txt beside each medium)")
    p.add_argument("--out", required=True, help="output folder: shards/, reports/, manifest.yaml (updated in place)")
    p.add_argument("--name", required=True, help="dataset name in the manifest (letters, digits, _ and -)")
    p.add_argument("--split", default="train")
    p.add_argument("--media-root", help="folder media paths are relative to (default: each input's folder)")
    p.add_argument("--task", help="json 'task' and manifest task (default per format: vqa, chat, asr, caption)")
    p.add_argument("--source", help="json 'source' (default: --name)")
    p.add_argument("--weight", type=float, default=1.0, help="mixture weight of the manifest entry")
    p.add_argument("--prompt", help="asr/captions user turn (default '<audio>\\nTranscribe the audio.', "
                                    "'<image>\\nDescribe the image.', ...)")
    p.add_argument("--system", help="system message prepended to samples that have none")
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--shard-bytes", type=float, default=5e8, help="start a new shard past this size")
    p.add_argument("--no-decode-check", action="store_true",
                   help="only check that media exist with a known extension (skip decoding)")
    _add_ray(p)
    p.set_defaults(func=lambda a: _run("build", _build, a))

    p = verbs.add_parser("dedup", help="exact + MinHash-LSH near-duplicate removal (streaming)")
    p.add_argument("manifest", help="input manifest YAML")
    p.add_argument("--out", required=True, help="output folder: shards/, manifest.yaml, reports/")
    p.add_argument("--split", help="only this split (default: every split, in manifest order)")
    p.add_argument("--datasets", help="comma-separated dataset names (default: all)")
    p.add_argument("--exact", default="sample", choices=["sample", "text", "media", "off"],
                   help="what an exact duplicate shares: text+media bytes (default), text, media bytes, or off")
    p.add_argument("--no-near", action="store_true", help="exact pass only")
    p.add_argument("--threshold", type=float, default=0.7, help="Jaccard threshold of near-duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--shingle", default="word", choices=["word", "char", "auto"],
                   help="shingle unit (auto: char when the text has CJK)")
    p.add_argument("--ngram", type=int, default=3, help="shingle length (words or characters)")
    p.add_argument("--seed", type=int, default=1, help="MinHash seed")
    p.add_argument("--near-ignore-media", action="store_true",
                   help="near-duplicate texts count even when their media differ")
    p.add_argument("--no-verify", action="store_true", help="trust LSH candidates without checking the estimate")
    p.add_argument("--lsh-bands", type=int, help="LSH bands (with --lsh-rows; default: datasketch's optimum)")
    p.add_argument("--lsh-rows", type=int)
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--dry-run", action="store_true", help="reports only, no shards or manifest")
    _add_ray(p)
    p.set_defaults(func=lambda a: _run("dedup", _dedup, a))

    p = verbs.add_parser("reweight", help="quality filters + mixture weights per source/task/cluster")
    p.add_argument("manifest", help="input manifest YAML")
    p.add_argument("--out", required=True, help="output folder: shards/, manifest.yaml (with weights), reports/")
    p.add_argument("--by", default="source",
                   help="group by: dataset, source, task, cluster, or json:FIELD (default: source)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight ~ group size ** alpha (1: by size, 0: groups equal; default 0.5)")
    p.add_argument("--boost", action="append", default=[], metavar="GROUP=F",
                   help="multiply a group's weight (or DATASET/GROUP=F); repeatable")
    p.add_argument("--clusters", type=int, default=8, help="k for --by cluster")
    p.add_argument("--fit-samples", type=int, default=5000, help="reservoir size for the cluster fit")
    p.add_argument("--max-groups", type=int, default=64, help="refuse more groups than this per dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--datasets", help="comma-separated dataset names (default: the whole split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-words", type=int, default=1, help="filter: words in the conversation")
    p.add_argument("--max-words", type=int, help="filter: words in the conversation")
    p.add_argument("--min-reply-words", type=int, default=1, help="filter: words in the assistant replies")
    p.add_argument("--max-repetition", type=_optional_float, default=0.5,
                   help="filter: fraction of repeated word 3-grams (default 0.5; 'off')")
    p.add_argument("--scripts", help="filter: allowed scripts, e.g. latin or latin,cjk (default: off)")
    p.add_argument("--min-script-ratio", type=float, default=0.8, help="of the letters, fraction in --scripts")
    p.add_argument("--max-bad-chars", type=_optional_float, default=0.01,
                   help="filter: fraction of U+FFFD/control characters (default 0.01; 'off')")
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--dry-run", action="store_true", help="reports only, no shards or manifest")
    _add_ray(p)
    p.set_defaults(func=lambda a: _run("reweight", _reweight, a))

    p = verbs.add_parser("stats", help="counts, modality mix, token-length histograms (table + PNG)")
    p.add_argument("manifest", help="manifest YAML")
    p.add_argument("--out", required=True, help="folder for stats.md, stats.json, stats.png")
    p.add_argument("--preset", default="7b", help="token arithmetic of this preset (no weights needed)")
    p.add_argument("--model", help="omni model folder: its tokenizer counts text, its config media")
    p.add_argument("--split", help="only this split")
    p.add_argument("--datasets", help="comma-separated dataset names")
    p.add_argument("--limit", type=positive_int, help="at most this many samples per dataset")
    _add_ray(p)
    p.set_defaults(func=lambda a: _run("stats", _stats, a))

    p = verbs.add_parser("lmms-task", help="held-out samples as local lmms-eval tasks (the items omni eval scores)")
    p.add_argument("manifest", help="manifest YAML")
    p.add_argument("--out", required=True, help="folder for the task YAMLs, items (JSONL) and media files")
    p.add_argument("--split", default="val")
    p.add_argument("--datasets", help="comma-separated dataset names (default: the whole split)")
    p.add_argument("--limit", type=positive_int, help="at most this many samples per dataset (as omni eval --limit)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="answer length (omni eval's: 8)")
    p.set_defaults(func=lambda a: _run("lmms-task", _lmms_task, a))
    return data

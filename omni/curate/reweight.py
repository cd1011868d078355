"""`omni data reweight`: quality filters, then mixture weights per source / task / cluster in the manifest.

BaichuanSEED's recipe is to collect broadly and fix the mixture afterwards: down-weight what is
over-represented, up-weight what is rare and good. The training mixture sampler draws a manifest
*entry* with probability weight / sum(weights) (unless a stage YAML names datasets with weights),
so a weight per group means an entry per group. This verb therefore streams every selected
dataset once, drops samples that fail the quality filters (each reported with key and reason),
writes the rest into one shard set per (dataset, group), and gives each its weight:

    weight(d, g) = w_d * boost(g) * n(d, g) ** alpha / Z

    n(d, g)  kept samples of group g in dataset d        w_d    the dataset's input weight
    alpha    1: as many draws as samples (size-proportional); 0: every group equal; 0.5 between
    boost    `--boost GROUP=F` (or DATASET/GROUP=F): up-weight rare high-quality groups (F > 1),
             down-weight others (F < 1); a boost naming no group is an error
    Z        --by dataset: mean of n ** alpha over datasets (weights stay around 1); otherwise the
             sum of n(d, g) ** alpha over d's groups, so without boosts a dataset keeps its mass w_d

Groups (`--by`): `dataset`, `source` and `task` (json fields of the sample), `json:FIELD` (any json
field, e.g. a cluster id from your own embedding clustering), or `cluster`: a built-in two-pass
clustering, spherical k-means on hashed bag-of-words TF-IDF features fitted on a reservoir sample
(`fit_samples`), then every sample assigned to its nearest centroid.

Quality heuristics (`QualityConfig`), each a filter with its own reject code and count:
length (words of the whole conversation, words of the assistant replies), repetition (fraction
of word n-grams that repeat an earlier n-gram of the same sample), charset/language (fraction of
letters in the allowed scripts), and garbage characters (U+FFFD and control characters).

Map/reduce (docs/curation.md, "Beyond one machine"): `quality_check` and `group_of` are maps over
samples; counting per unit is the reduce; `mixture_weights` is a pure function of the counts;
the k-means fit is a reduce over a bounded reservoir.
"""
from __future__ import annotations

import logging
import math
import random
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omni.curate.common import (
    CurationError,
    Reject,
    RejectLog,
    ShardSink,
    Unreadable,
    conversation_text,
    entry_dict,
    map_samples,
    media_members,
    safe_name,
    write_json,
    write_manifest,
)
from omni.data.loader import read_meta
from omni.data.manifest import DatasetEntry, load_manifest
from omni.errors import SampleError
from omni.modalities import EXTENSIONS

log = logging.getLogger(__name__)

SCRIPTS = {  # code point ranges per script (letters only are counted)
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
    "greek": "\u0370-\u03ff",
    "cyrillic": "\u0400-\u04ff",
    "hebrew": "\u0590-\u05ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
    "cjk": "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff",
}
_LETTER = re.compile(r"[^\W\d_]")
_BAD = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WORD = re.compile(r"\w+")
BY_CHOICES = ("dataset", "source", "task", "cluster", "json:FIELD")


@dataclass
class QualityConfig:
    min_words: int = 1                      # words in the whole conversation (placeholders excluded)
    max_words: int | None = None
    min_reply_words: int = 1                # words in the assistant replies
    max_repetition: float | None = 0.5      # fraction of repeated word n-grams; None: off
    repetition_ngram: int = 3
    scripts: list[str] | None = None        # allowed scripts, e.g. ["latin"] or ["latin", "cjk"]; None: off
    min_script_ratio: float = 0.8           # of the letters, at least this fraction in `scripts`
    max_bad_chars: float | None = 0.01      # U+FFFD / control characters per character; None: off

    def __post_init__(self):
        unknown = sorted(set(self.scripts or []) - set(SCRIPTS))
        if unknown:
            raise CurationError(f"scripts {unknown} unknown; known: {sorted(SCRIPTS)}")
        self._script_re = (re.compile("[" + "".join(SCRIPTS[s] for s in self.scripts) + "]")
                           if self.scripts else None)


def repetition_ratio(words: list[str], n: int = 3) -> float:
    """Fraction of the word n-grams that repeat an earlier n-gram of the same text (0: none)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def quality_check(messages: list[dict], cfg: QualityConfig) -> None:
    """Raise Reject(code, reason) when the sample fails a filter (the map step)."""
    text = conversation_text(messages)
    words = _WORD.findall(text.lower())
    reply_words = len(_WORD.findall(conversation_text(messages, ("assistant",))))
    if len(words) < cfg.min_words:
        raise Reject("too_short", f"{len(words)} words < min_words {cfg.min_words}")
    if cfg.max_words is not None and len(words) > cfg.max_words:
        raise Reject("too_long", f"{len(words)} words > max_words {cfg.max_words}")
    if reply_words < cfg.min_reply_words:
        raise Reject("short_reply", f"{reply_words} reply words < min_reply_words {cfg.min_reply_words}")
    if cfg.max_repetition is not None:
        rep = repetition_ratio(words, cfg.repetition_ngram)
        if rep > cfg.max_repetition:
            raise Reject("repetitive", f"repetition ratio {rep:.2f} > {cfg.max_repetition}")
    if cfg.max_bad_chars is not None and text:
        bad = len(_BAD.findall(text)) / len(text)
        if bad > cfg.max_bad_chars:
            raise Reject("bad_chars", f"{bad:.1%} replacement/control characters > {cfg.max_bad_chars:.1%}")
    if cfg._script_re is not None:
        letters = len(_LETTER.findall(text))
        if letters:
            ratio = len(cfg._script_re.findall(text)) / letters
            if ratio < cfg.min_script_ratio:
                raise Reject("charset", f"{ratio:.0%} of letters in {cfg.scripts} < {cfg.min_script_ratio:.0%}")


# ---------------------------------------------------------------- clusters
class TextClusters:
    """Spherical k-means over hashed bag-of-words TF-IDF vectors, fitted on a bounded reservoir."""

    def __init__(self, k: int, dim: int = 1024, fit_samples: int = 5000, iters: int = 25, seed: int = 0):
        if k < 1 or dim < 8 or fit_samples < k:
            raise CurationError(f"clusters: need k >= 1, dim >= 8 and fit_samples >= k; got {k}, {dim}, {fit_samples}")
        self.k, self.dim, self.fit_samples, self.iters, self.seed = k, dim, fit_samples, iters, seed
        self.centroids: np.ndarray | None = None
        self.idf = np.ones(dim, np.float32)

    def tf(self, text: str) -> np.ndarray:
        idx = [zlib.crc32(w.encode("utf-8")) % self.dim for w in _WORD.findall(text.lower())]
        return np.log1p(np.bincount(idx, minlength=self.dim).astype(np.float32))

    def _vec(self, tf: np.ndarray) -> np.ndarray:
        v = tf * self.idf
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def fit(self, texts) -> "TextClusters":
        rng = random.Random(self.seed)
        reservoir: list[np.ndarray] = []
        for i, text in enumerate(texts):  # reservoir sampling: memory bounded by fit_samples
            if len(reservoir) < self.fit_samples:
                reservoir.append(self.tf(text))
            else:
                j = rng.randrange(i + 1)
                if j < self.fit_samples:
                    reservoir[j] = self.tf(text)
        if len(reservoir) < self.k:
            raise CurationError(f"clusters: {len(reservoir)} samples passed the filters, fewer than k={self.k}")
        tf = np.stack(reservoir)
        df = (tf > 0).sum(0)
        self.idf = (np.log((1 + len(tf)) / (1 + df)) + 1).astype(np.float32)
        x = tf * self.idf
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        gen = np.random.default_rng(self.seed)
        centroids = [x[gen.integers(len(x))]]  # k-means++ seeding on cosine distance
        for _ in range(1, self.k):
            d = np.clip(1 - np.max(x @ np.stack(centroids).T, axis=1), 0, None) ** 2
            p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1 / len(x))
            centroids.append(x[gen.choice(len(x), p=p)])
        c = np.stack(centroids)
        for _ in range(self.iters):
            labels = np.argmax(x @ c.T, axis=1)
            new = np.stack([x[labels == j].sum(0) if np.any(labels == j) else c[j] for j in range(self.k)])
            new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            if np.allclose(new, c):
                break
            c = new
        self.centroids = c.astype(np.float32)
        return self

    def assign(self, text: str) -> int:
        return int(np.argmax(self.centroids @ self._vec(self.tf(text))))

    def label(self, text: str) -> str:
        return f"c{self.assign(text):0{len(str(self.k - 1))}d}"


# ---------------------------------------------------------------- groups and weights
def group_of(by: str, meta: dict, entry: DatasetEntry, clusters: TextClusters | None = None) -> str:
    if by == "dataset":
        return entry.name
    if by == "source":
        return str(meta.get("source") or "unknown")
    if by == "task":
        return str(meta.get("task") or entry.task or "unknown")
    if by == "cluster":
        return clusters.label(conversation_text(meta["messages"]))
    if by.startswith("json:"):
        value = meta
        for part in by[5:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return "none" if value is None else str(value)
    raise CurationError(f"--by {by!r}: choose one of {list(BY_CHOICES)}")


@dataclass
class Unit:
    dataset: str
    group: str
    count: int
    base_weight: float = 1.0
    weight: float = 0.0


def parse_boosts(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        if "=" not in item:
            raise CurationError(f"--boost {item!r}: expected GROUP=FACTOR or DATASET/GROUP=FACTOR")
        key, value = item.rsplit("=", 1)
        try:
            f = float(value)
        except ValueError:
            raise CurationError(f"--boost {item!r}: {value!r} is not a number") from None
        if not f > 0 or not math.isfinite(f):
            raise CurationError(f"--boost {item!r}: the factor must be > 0 (drop data with filters instead)")
        out[key] = f
    return out


def mixture_weights(units: list[Unit], by: str, alpha: float, boosts: dict[str, float]) -> list[Unit]:
    """Fill `unit.weight` (see the module docstring); errors on boosts that match no unit."""
    used = set()

    def boost(u: Unit) -> float:
        for key in (f"{u.dataset}/{u.group}", u.group):
            if key in boosts:
                used.add(key)
                return boosts[key]
        return 1.0

    if by == "dataset":
        scopes = [units]
        norms = [float(np.mean([u.count ** alpha for u in units]))] if units else []
    else:
        by_ds: dict[str, list[Unit]] = {}
        for u in units:
            by_ds.setdefault(u.dataset, []).append(u)
        scopes = list(by_ds.values())
        norms = [sum(u.count ** alpha for u in s) for s in scopes]
    for scope, z in zip(scopes, norms):
        for u in scope:
            u.weight = u.base_weight * boost(u) * u.count ** alpha / z
    unused = sorted(set(boosts) - used)
    if unused:
        known = sorted({u.group for u in units} | {f"{u.dataset}/{u.group}" for u in units})
        raise CurationError(f"--boost {unused}: no such group; groups are {known[:50]}")
    return units


# ---------------------------------------------------------------- the verb
@dataclass
class ReweightResult:
    manifest: Path | None
    units: list[Unit]
    input: dict[str, int]
    rejected: dict[str, dict[str, int]]
    seconds: float
    report_file: Path
    rejects_file: Path
    old_mix: dict[str, float] = field(default_factory=dict)

    @property
    def new_mix(self) -> dict[str, float]:
        total = sum(u.weight for u in self.units) or 1.0
        return {f"{u.dataset}/{u.group}": u.weight / total for u in self.units}


def _slug(group: str) -> str:
    s = safe_name(group)[:48]
    return s if s == group else f"{s}_{zlib.crc32(group.encode('utf-8')):08x}"


def unit_stem(entry: DatasetEntry, by: str, group: str) -> str:
    """File stem of one (dataset, group) output set."""
    return f"{entry.name}-{entry.split}" if by == "dataset" else f"{entry.name}-{entry.split}-{_slug(group)}"


def unit_stem_of(rank, raw, verdict, entries: list[DatasetEntry], by: str) -> str | None:
    """--ray, on the workers: the set a sample is written to (the loop in `reweight` writes the same
    samples: readable and passing the filters), None for the rest."""
    if isinstance(raw, Unreadable) or not isinstance(verdict, tuple):
        return None
    meta, label = verdict
    entry = entries[rank[0]]
    return unit_stem(entry, by, label if label is not None else group_of(by, meta, entry))


def reweight(manifest: str | Path, out_dir: str | Path, by: str = "source", alpha: float = 0.5,
             boosts: dict[str, float] | None = None, quality: QualityConfig | None = None,
             split: str = "train", datasets: list[str] | None = None, clusters: int = 8,
             fit_samples: int = 5000, max_groups: int = 64, samples_per_shard: int = 5000,
             shard_bytes: float = 5e8, dry_run: bool = False, progress: bool = True, seed: int = 0,
             backend=None) -> ReweightResult:
    """Filter, group and reweight the `split` datasets of `manifest` into `out_dir` (shards, manifest,
    reports/reweight.json with counts and old/new mixture shares, reports/reweight.rejects.jsonl).
    `backend`: None runs here; a `RayBackend` runs the filters and cluster labels on Ray."""
    if by not in BY_CHOICES[:-1] and not (by.startswith("json:") and len(by) > 5):
        raise CurationError(f"--by {by!r}: choose one of {list(BY_CHOICES)}")
    if not math.isfinite(alpha) or alpha < 0:
        raise CurationError(f"--alpha {alpha}: need alpha >= 0 (1 = proportional to size, 0 = equal)")
    quality = quality or QualityConfig()
    boosts = dict(boosts or {})
    m = load_manifest(manifest)
    entries = m.select(split, datasets)
    out = Path(out_dir)
    start = time.perf_counter()
    model = None
    if by == "cluster":
        model = TextClusters(clusters, fit_samples=fit_samples, seed=seed).fit(
            _passing_texts(entries, quality, progress, backend))
    rejects = RejectLog(out / "reports" / "reweight.rejects.jsonl")
    sinks: dict[tuple[str, str], ShardSink] = {}
    seen_modalities: dict[tuple[str, str], set[str]] = {}
    bar = tqdm(total=sum(e.num_samples for e in entries) or None, unit="sample", desc="reweight",
               disable=not progress)
    by_entry = {e.name: e for e in entries}
    groups_of: dict[str, set[str]] = {e.name: set() for e in entries}
    n_in = {e.name: 0 for e in entries}
    judge = partial(judge_sample, quality=quality, clusters=model)
    datasink = None
    if backend is not None and not dry_run:
        datasink = backend.datasink(out / "shards", partial(unit_stem_of, entries=entries, by=by),
                                    samples_per_shard, shard_bytes)

    def fold(samples) -> None:
        """The pass's bookkeeping over (rank, raw, verdict) in manifest order: counts, rejects, groups,
        and (in-process) the samples written to their group's set."""
        for (di, _, _), raw, verdict in samples:
            entry = entries[di]
            if isinstance(raw, Unreadable):
                rejects.add("?", "unreadable", str(raw))
                continue
            bar.update()
            n_in[entry.name] += 1
            key = raw.get("__key__", "?")
            if isinstance(verdict, SampleError):
                rejects.add(key, "bad_sample", str(verdict), where=raw.get("__url__"), dataset=entry.name)
                continue
            if isinstance(verdict, Reject):
                rejects.add(key, verdict.code, verdict.reason, where=raw.get("__url__"), dataset=entry.name)
                continue
            meta, label = verdict
            group = label if label is not None else group_of(by, meta, entry)
            unit = (entry.name, group)
            if unit not in sinks:
                groups_here = groups_of[entry.name]
                groups_here.add(group)
                if len(groups_here) > max_groups:
                    raise CurationError(
                        f"dataset {entry.name}: more than {max_groups} groups by {by!r} "
                        f"(e.g. {sorted(groups_here)[:5]}); pick a coarser field or raise --max-groups")
                stem = unit_stem(entry, by, group)
                sinks[unit] = (datasink.sink(stem) if datasink else
                               ShardSink(out / "shards", stem, samples_per_shard, shard_bytes))
                seen_modalities[unit] = set()
            sink = sinks[unit]
            if dry_run:
                sink.count += 1
            else:
                sink.write(raw)
            seen_modalities[unit] |= {kind for kind, _, _, _ in media_members(raw)}

    try:
        if backend is None:
            fold(map_samples(entries, judge))
        elif datasink is None:
            fold(backend.map_samples(entries, judge))
        else:
            backend.write_samples(entries, datasink, fold, judge)
    finally:
        bar.close()
        rejects.close()
        for s in sinks.values():
            s.close()
    units = [Unit(d, g, s.count, by_entry[d].weight) for (d, g), s in sinks.items()]
    mixture_weights(units, by, alpha, boosts)
    total_w = sum(e.weight for e in entries)
    old_mix = {}
    for u in units:  # what the input manifest gave this unit: the dataset's mass, split by size
        kept_in_ds = sum(v.count for v in units if v.dataset == u.dataset)
        old_mix[f"{u.dataset}/{u.group}"] = by_entry[u.dataset].weight / total_w * u.count / kept_in_ds
    manifest_out = None
    if not dry_run:
        new_entries = []
        for u in units:
            entry, sink = by_entry[u.dataset], sinks[(u.dataset, u.group)]
            name = u.dataset if by == "dataset" else f"{u.dataset}-{_slug(u.group)}"
            mods = [k for k in EXTENSIONS if k in seen_modalities[(u.dataset, u.group)]]
            task = u.group if by == "task" else entry.task
            new_entries.append(entry_dict(entry, name=name, urls=sink.urls(out), num_samples=u.count,
                                          weight=u.weight, modalities=mods, task=task))
        manifest_out = write_manifest(out / "manifest.yaml", f"{m.name}-reweighted", new_entries, replace=True)
    seconds = time.perf_counter() - start
    result = ReweightResult(manifest_out, units, n_in, {d: dict(c) for d, c in rejects.by_dataset.items()},
                            seconds, out / "reports" / "reweight.json", rejects.path, old_mix)
    new_mix = result.new_mix
    write_json(result.report_file, {
        "manifest_in": str(manifest), "manifest_out": str(manifest_out) if manifest_out else None,
        "by": by, "alpha": alpha, "boosts": boosts, "split": split,
        "quality": {k: v for k, v in asdict(quality).items()},
        "input": n_in, "rejected": result.rejected,
        "units": [{"dataset": u.dataset, "group": u.group, "samples": u.count, "weight": round(u.weight, 6),
                   "old_share": round(old_mix[f"{u.dataset}/{u.group}"], 6),
                   "new_share": round(new_mix[f"{u.dataset}/{u.group}"], 6)} for u in units],
        "seconds": round(seconds, 3), "rejects_file": str(rejects.path),
    })
    return result


def judge_sample(raw: dict, quality: QualityConfig, clusters: TextClusters | None = None) -> tuple[dict, str | None]:
    """The map step: (meta, cluster label or None) of a sample that passes the filters; raises
    Reject (a filter) or SampleError (bad json)."""
    meta = read_meta(raw)
    quality_check(meta["messages"], quality)
    return meta, clusters.label(conversation_text(meta["messages"])) if clusters is not None else None


def _passing_texts(entries: list[DatasetEntry], quality: QualityConfig, progress: bool, backend=None):
    """Pass 1 of --by cluster: the conversation text of every sample that passes the filters, in order."""
    bar = tqdm(total=sum(e.num_samples for e in entries) or None, unit="sample", desc="cluster fit",
               disable=not progress)
    judge = partial(judge_sample, quality=quality)
    samples = map_samples(entries, judge) if backend is None else backend.map_samples(entries, judge, keep_raw=False)
    for _, raw, verdict in samples:
        if isinstance(raw, Unreadable):
            continue
        bar.update()
        if isinstance(verdict, tuple):
            yield conversation_text(verdict[0]["messages"])
    bar.close()


def format_result(r: ReweightResult) -> str:
    head = f"{'dataset':<22} {'group':<22} {'samples':>8} {'old %':>7} {'new %':>7} {'weight':>9}"
    lines = [head, "-" * len(head)]
    new_mix = r.new_mix
    for u in r.units:
        k = f"{u.dataset}/{u.group}"
        lines.append(f"{u.dataset:<22} {u.group[:22]:<22} {u.count:>8} {100 * r.old_mix[k]:>6.1f}% "
                     f"{100 * new_mix[k]:>6.1f}% {u.weight:>9.4f}")
    for d, n in r.input.items():
        rej = r.rejected.get(d, {})
        detail = ", ".join(f"{c} {k}" for k, c in sorted(rej.items(), key=lambda kv: -kv[1])) or "none"
        lines.append(f"{d}: {n} in, rejected {sum(rej.values())} ({detail})")
    lines.append(f"report: {r.report_file}\nrejects: {r.rejects_file}")
    if r.manifest:
        lines.append(f"manifest: {r.manifest}")
    return "\n".join(lines)


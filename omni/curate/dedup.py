"""`omni data dedup`: exact and MinHash-LSH near-duplicate removal over a manifest's shards, streaming.

A sample is a *document*: its whole conversation (every message, roles included) plus its media.
- **Exact** (`exact`): a 16-byte BLAKE2b digest of
    sample  the normalised text (NFKC, lowercase, whitespace collapsed) *and* the media bytes (default)
    text    the normalised text only (the same caption on different images counts as a duplicate)
    media   the media bytes only (the same image with a different question counts; text-only
            samples fall back to their text)
    off     no exact pass.
- **Near** (`near`): datasketch MinHash over the document's shingles (word n-grams, character
  n-grams for scripts without spaces, or `auto`: characters when the text has CJK), cut into LSH
  bands (`lsh_params`, default datasketch's optimum for `threshold`). Every shingle is prefixed
  with the digest of the sample's media, so two samples are near-duplicates only when their media
  are byte-identical and their texts are near-identical: a caption dataset whose prompts are all
  the same template is not collapsed. `near_ignore_media` drops the prefix (text-only near-dup
  across different media). Candidates sharing a band are verified (estimated Jaccard >=
  threshold) unless `verify` is off.

Clusters (components.py): duplicates are the connected components of exact and near edges; the
earliest sample of each component in manifest order (dataset, shard, position) is kept and every
other member is removed and reported with that kept key (across datasets and splits too: a val
sample that repeats a train sample is removed from val when train comes first in the manifest).
A chain A~B~C removes B and C even when C is not similar to A (docs/decisions.md).

Map/reduce (docs/curation.md, "Beyond one machine"): `signature_of` is the map (raw sample ->
`Signature`, pure), the group-bys by digest and band key plus `components` are the reduce (only
duplicates' edges are held together), and writing the kept samples is a filter in a second pass
(on Ray Data's write tasks, where `kept_stem` says, omni/curate/ray_write.py).
In-process the group-bys are dicts (`removed_in_memory`); `omni.curate.ray_backend` runs them as
Ray Data shuffles. `dedup_texts` runs the same functions over plain strings (PAS prompts).
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from datasketch import MinHash
from tqdm import tqdm

from omni.curate.common import (
    CurationError,
    RejectLog,
    ShardSink,
    Unreadable,
    digest,
    entry_dict,
    map_samples,
    media_members,
    normalise,
    strip_placeholders,
    write_json,
    write_manifest,
)
from omni.curate.components import (
    Rank,
    Removal,
    band_keys,
    bucket_edges,
    components,
    exact_edges,
    lsh_shape,
)
from omni.data.loader import read_meta
from omni.data.manifest import DatasetEntry, load_manifest
from omni.errors import SampleError

log = logging.getLogger(__name__)

EXACT_MODES = ("sample", "text", "media", "off")
SHINGLES = ("word", "char", "auto")
_TOKEN = re.compile(r"\w+")
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class DedupConfig:
    exact: str = "sample"           # sample | text | media | off
    near: bool = True
    threshold: float = 0.7          # Jaccard similarity of shingle sets
    num_perm: int = 128             # MinHash permutations
    shingle: str = "word"           # word | char | auto (char when the text has CJK)
    ngram: int = 3                  # shingle length in words or characters
    seed: int = 1                   # MinHash permutation seed (same seed = comparable signatures)
    near_ignore_media: bool = False
    verify: bool = True             # check LSH candidates' estimated Jaccard against the threshold
    lsh_params: tuple[int, int] | None = None  # (bands, rows); default: datasketch's optimum

    def validate(self) -> None:
        if self.exact not in EXACT_MODES:
            raise CurationError(f"exact={self.exact!r}: choose one of {list(EXACT_MODES)}")
        if self.shingle not in SHINGLES:
            raise CurationError(f"shingle={self.shingle!r}: choose one of {list(SHINGLES)}")
        if not 0 < self.threshold <= 1:
            raise CurationError(f"threshold={self.threshold}: need 0 < threshold <= 1")
        if self.num_perm < 2 or self.ngram < 1:
            raise CurationError(f"need num_perm >= 2 and ngram >= 1, got {self.num_perm}, {self.ngram}")
        if self.lsh_params and self.lsh_params[0] * self.lsh_params[1] > self.num_perm:
            raise CurationError(f"lsh_params {self.lsh_params}: bands x rows must be <= num_perm {self.num_perm}")


# ---------------------------------------------------------------- map: sample -> signature
@dataclass
class Signature:
    exact: bytes | None             # 16-byte digest, None when the exact pass is off
    minhash: np.ndarray | None      # uint32 [num_perm], None when near is off or the text is empty


class Signer:
    """Sample (meta json + raw members) -> Signature. Pure: same input, same signature, any process."""

    def __init__(self, cfg: DedupConfig):
        cfg.validate()
        self.cfg = cfg
        self.permutations = MinHash(cfg.num_perm, seed=cfg.seed, scheme="affine32").permutations

    def text_key(self, messages: list[dict]) -> bytes:
        return "\x1e".join(f"{m.get('role')}\x1f{normalise(str(m.get('content', '')))}"
                           for m in messages).encode("utf-8")

    def shingles(self, messages: list[dict]) -> set[str]:
        text = " ".join(strip_placeholders(str(m.get("content", ""))) for m in messages)
        words = _TOKEN.findall(normalise(text))
        if not words:
            return set()
        n = self.cfg.ngram
        unit = self.cfg.shingle
        if unit == "auto":
            unit = "char" if _CJK.search(text) else "word"
        if unit == "word":
            return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
        s = " ".join(words)
        return {s[i:i + n] for i in range(max(1, len(s) - n + 1))}

    def __call__(self, meta: dict, raw: dict) -> Signature:
        messages = meta["messages"]
        media = media_members(raw)
        media_key = digest(*(kind.encode() + digest(value) for kind, _, _, value in media)) if media else b""
        exact = None
        if self.cfg.exact == "sample":
            exact = digest(self.text_key(messages), media_key)
        elif self.cfg.exact == "text" or (self.cfg.exact == "media" and not media):
            exact = digest(self.text_key(messages))
        elif self.cfg.exact == "media":
            exact = media_key
        minhash = None
        if self.cfg.near:
            grams = self.shingles(messages)
            if grams:
                prefix = b"" if self.cfg.near_ignore_media else media_key
                m = MinHash(self.cfg.num_perm, permutations=self.permutations, scheme="affine32")
                m.update_batch([prefix + g.encode("utf-8") for g in grams])
                minhash = m.hashvalues
        return Signature(exact, minhash)


def signature_of(signer: Signer, raw: dict) -> Signature:
    """The map step over one raw shard sample (raises SampleError for a bad json member)."""
    return signer(read_meta(raw), raw)


# ---------------------------------------------------------------- reduce: components
def removed_in_memory(signatures: Iterable[tuple[Rank, Signature]], cfg: DedupConfig) -> dict[Rank, Removal]:
    """The in-process reduce: digests and LSH band buckets as dicts, then `components` (the Ray
    path runs the same group-bys as shuffles)."""
    bands, rows = lsh_shape(cfg.threshold, cfg.num_perm, cfg.lsh_params) if cfg.near else (0, 0)
    by_digest: dict[bytes, list[Rank]] = defaultdict(list)
    buckets: dict[str, list[tuple[Rank, np.ndarray]]] = defaultdict(list)
    for rank, sig in signatures:
        if sig.exact is not None:
            by_digest[sig.exact].append(rank)
        if cfg.near and sig.minhash is not None:
            for key in band_keys(sig.minhash, bands, rows):
                buckets[key].append((rank, sig.minhash))
    edges = [e for ranks in by_digest.values() if len(ranks) > 1 for e in exact_edges(ranks)]
    edges += [e for members in buckets.values() if len(members) > 1
              for e in bucket_edges(members, cfg.threshold, cfg.verify)]
    return components(edges)


def dedup_texts(texts: list[str], cfg: DedupConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """Plain strings through the same `Signer` and components as `dedup`, each text a one-message
    document without media: (kept texts in order, [(removed text, the kept text it duplicates)])."""
    signer = Signer(cfg)
    removed = removed_in_memory((((0, 0, i), signer({"messages": [{"role": "user", "content": t}]}, {}))
                                 for i, t in enumerate(texts)), cfg)
    kept = [t for i, t in enumerate(texts) if (0, 0, i) not in removed]
    return kept, [(texts[rank[2]], texts[r.kept[2]]) for rank, r in sorted(removed.items())]


# ---------------------------------------------------------------- the verb
@dataclass
class DatasetCounts:
    name: str
    split: str
    input: int = 0
    unreadable: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    kept: int = 0
    duplicate_of: Counter = field(default_factory=Counter)   # removed here, by the dataset kept in


@dataclass
class DedupResult:
    manifest: Path | None
    counts: list[DatasetCounts]
    clusters: int
    largest_clusters: list[dict]
    seconds: float
    report_file: Path
    duplicates_file: Path

    @property
    def total_input(self) -> int:
        return sum(c.input for c in self.counts)

    @property
    def samples_per_s(self) -> float:
        return self.total_input / max(self.seconds, 1e-9)


def dedup(manifest: str | Path, out_dir: str | Path, cfg: DedupConfig, split: str | None = None,
          datasets: list[str] | None = None, samples_per_shard: int = 5000, shard_bytes: float = 5e8,
          dry_run: bool = False, progress: bool = True, top_clusters: int = 20, backend=None) -> DedupResult:
    """Decide every duplicate (signatures -> components), then stream every selected entry once more
    and write the kept samples as new shards plus a manifest, and reports: `reports/dedup.json`
    (counts per dataset, cluster sizes) and `reports/duplicates.jsonl` (one line per removed
    sample: its key, kind, and the kept key of its cluster). `backend`: None runs in this process;
    a `RayBackend` (omni/curate/ray_backend.py) runs the maps and group-bys on Ray, same output."""
    cfg.validate()
    m = load_manifest(manifest)
    entries = _select(m, split, datasets)
    out = Path(out_dir)
    start = time.perf_counter()
    stems = [f"{e.name}-{e.split}" for e in entries]
    datasink = samples = None
    if backend is None:
        signed = map_samples(entries, partial(signature_of, Signer(cfg)))
        removed = removed_in_memory(((rank, sig) for rank, _, sig in signed if isinstance(sig, Signature)), cfg)
        samples = map_samples(entries)
    else:
        removed = backend.dedup_removed(entries, cfg)
        if dry_run:
            samples = backend.map_samples(entries)
        else:
            datasink = backend.datasink(out / "shards", partial(kept_stem, stems=stems), samples_per_shard,
                                        shard_bytes)
    roots = {r.kept for r in removed.values()}
    root_key: dict[Rank, str] = {}
    cluster_size: Counter = Counter()           # kept rank -> number of removed duplicates
    rejects = RejectLog(out / "reports" / "dedup.rejects.jsonl")
    dup_path = out / "reports" / "duplicates.jsonl"
    dup_path.parent.mkdir(parents=True, exist_ok=True)
    counts = [DatasetCounts(e.name, e.split) for e in entries]
    sinks = [None if dry_run else datasink.sink(stem) if datasink else
             ShardSink(out / "shards", stem, samples_per_shard, shard_bytes) for stem in stems]
    bar = tqdm(total=sum(e.num_samples for e in entries) or None, unit="sample", desc="dedup", disable=not progress)

    def fold(samples) -> None:
        """The kept pass's bookkeeping over (rank, raw, _) in manifest order: counts, rejects, the
        duplicates' report lines, and (in-process) the kept samples written."""
        for rank, raw, _ in samples:
            di = rank[0]
            entry, c = entries[di], counts[di]
            if isinstance(raw, Unreadable):
                c.unreadable += 1
                rejects.add("?", "unreadable", str(raw), dataset=entry.name)
                continue
            bar.update()
            c.input += 1
            key = raw.get("__key__", "?")
            try:
                read_meta(raw)
            except SampleError as e:
                c.unreadable += 1
                rejects.add(key, "bad_sample", str(e), where=raw.get("__url__"), dataset=entry.name)
                continue
            r = removed.get(rank)
            if r is None:
                if rank in roots:
                    root_key[rank] = key
                c.kept += 1
                if sinks[di] is not None:
                    sinks[di].write(raw)
                continue
            rep = entries[r.kept[0]]
            cluster_size[r.kept] += 1
            c.duplicate_of[rep.name] += 1
            if r.kind == "exact":
                c.exact_removed += 1
            else:
                c.near_removed += 1
            dups.write(json.dumps({
                "dataset": entry.name, "split": entry.split, "key": key, "shard": raw.get("__url__"),
                "kind": r.kind, "similarity": round(r.similarity, 4),
                "duplicate_of": {"dataset": rep.name, "split": rep.split, "key": root_key[r.kept]},
            }, ensure_ascii=False) + "\n")

    with dup_path.open("w", encoding="utf-8") as dups:
        if datasink is None:
            fold(samples)
        else:
            backend.write_samples(entries, datasink, fold, marked=removed)
    bar.close()
    rejects.close()
    new_entries = []
    for entry, sink in zip(entries, sinks):
        if sink is None:
            continue
        sink.close()
        if sink.count:
            new_entries.append(entry_dict(entry, urls=sink.urls(out), num_samples=sink.count))
        else:
            log.warning("dedup: dataset %s/%s has no sample left; left out of the manifest", entry.name, entry.split)
    seconds = time.perf_counter() - start
    largest = [{"dataset": entries[rank[0]].name, "key": root_key[rank], "duplicates": n}
               for rank, n in sorted(cluster_size.items(), key=lambda kv: (-kv[1], kv[0]))[:top_clusters]]
    sizes = Counter(n + 1 for n in cluster_size.values())
    manifest_out = None
    if not dry_run:
        manifest_out = write_manifest(out / "manifest.yaml", f"{m.name}-dedup", new_entries, replace=True)
    report = {
        "manifest_in": str(manifest), "manifest_out": str(manifest_out) if manifest_out else None,
        "config": asdict(cfg),
        "lsh_bands_rows": list(lsh_shape(cfg.threshold, cfg.num_perm, cfg.lsh_params)) if cfg.near else None,
        "datasets": [{**{k: v for k, v in asdict(c).items() if k != "duplicate_of"},
                      "removed": c.exact_removed + c.near_removed,
                      "duplicate_of_dataset": dict(c.duplicate_of)} for c in counts],
        "clusters": len(cluster_size),
        "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},   # size (kept + removed) -> count
        "largest_clusters": largest,
        "seconds": round(seconds, 3),
        "samples_per_s": round(sum(c.input for c in counts) / max(seconds, 1e-9), 1),
        "duplicates_file": str(dup_path),
    }
    report_file = write_json(out / "reports" / "dedup.json", report)
    return DedupResult(manifest_out, counts, len(cluster_size), largest, seconds, report_file, dup_path)


def kept_stem(rank: Rank, raw, removed: bool, stems: list[str]) -> str | None:
    """--ray, on the write tasks: the set a sample of the kept pass is written to (`removed`: its rank
    is a removed duplicate's; the loop in `dedup` keeps the same samples: readable, valid json, not
    removed)."""
    if isinstance(raw, Unreadable) or removed:
        return None
    try:
        read_meta(raw)
    except SampleError:
        return None
    return stems[rank[0]]


def _select(m, split: str | None, names: list[str] | None) -> list[DatasetEntry]:
    if split is not None:
        return m.select(split, names)
    entries = [d for d in m.datasets if not names or d.name in names]
    missing = sorted(set(names or []) - {d.name for d in m.datasets})
    if missing:
        available = sorted({d.name for d in m.datasets})
        raise CurationError(f"manifest {m.name}: no dataset(s) {missing}; available: {available}")
    if not entries:
        raise CurationError(f"manifest {m.name}: no datasets selected")
    return entries


def format_result(r: DedupResult) -> str:
    head = f"{'dataset':<24} {'split':<6} {'input':>8} {'exact':>8} {'near':>8} {'bad':>6} {'kept':>8}"
    lines = [head, "-" * len(head)]
    for c in r.counts:
        lines.append(f"{c.name:<24} {c.split:<6} {c.input:>8} {c.exact_removed:>8} {c.near_removed:>8} "
                     f"{c.unreadable:>6} {c.kept:>8}")
    lines.append(f"{r.clusters} duplicate clusters; {r.total_input} samples in {r.seconds:.1f} s "
                 f"({r.samples_per_s:.0f} samples/s)")
    lines.append(f"report: {r.report_file}\nduplicates: {r.duplicates_file}")
    if r.manifest:
        lines.append(f"manifest: {r.manifest}")
    return "\n".join(lines)

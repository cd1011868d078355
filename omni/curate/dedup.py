"""`omni data dedup`: exact and MinHash-LSH near-duplicate removal over a manifest's shards, streaming.

A sample is a *document*: its whole conversation (every message, roles included) plus its media.
- **Exact** (`exact`): a 16-byte BLAKE2b digest of
    sample  the normalised text (NFKC, lowercase, whitespace collapsed) *and* the media bytes (default)
    text    the normalised text only (the same caption on different images counts as a duplicate)
    media   the media bytes only (the same image with a different question counts; text-only
            samples fall back to their text)
    off     no exact pass.
- **Near** (`near`): datasketch MinHash over the document's shingles (word n-grams, character
  n-grams for scripts without spaces, or `auto`: characters when the text has CJK), indexed in
  a `MinHashLSH` at `threshold` (Jaccard). Every shingle is prefixed with the digest of the
  sample's media, so two samples are near-duplicates only when their media are byte-identical
  and their texts are near-identical: a caption dataset whose prompts are all the same template
  is not collapsed. `near_ignore_media` drops the prefix (text-only near-dup across different
  media). LSH candidates are verified against the stored signature (estimated Jaccard >=
  threshold) unless `verify` is off.

Order: manifest order, shard order; the first occurrence is kept and every later duplicate is
removed and reported with the key it duplicates (across datasets and splits too: a val sample
that repeats a train sample is removed from val when train comes first in the manifest).

Map/reduce (docs/curation.md, "Beyond one machine"): `Signer` is the map (sample -> `Signature`,
pure), `DedupIndex` is the one reduce (exact digests + the LSH index + signatures of kept
samples, in memory: about `DedupIndex.bytes_per_sample` per kept sample, measured in
docs/benchmarks.md), and writing the kept samples is a filter. In-process the three run in one
streaming pass; a Ray path would map `Signer` over blocks, feed the signatures to one
`DedupIndex` actor in manifest order, and filter. `dedup_texts` runs the same pair over plain
strings (PAS prompts).
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from tqdm import tqdm

from omni.curate.common import (
    CurationError,
    ReadErrors,
    RejectLog,
    ShardSink,
    digest,
    entry_dict,
    iter_entry,
    media_members,
    normalise,
    strip_placeholders,
    write_json,
    write_manifest,
)
from omni.data.loader import read_meta
from omni.data.manifest import DatasetEntry, load_manifest
from omni.errors import SampleError

log = logging.getLogger(__name__)

EXACT_MODES = ("sample", "text", "media", "off")
SHINGLES = ("word", "char", "auto")
_TOKEN = re.compile(r"\w+")
_CJK = re.compile(r"[\u3400-\u9fff]")
_REMOVED = (-1, "")


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


# ---------------------------------------------------------------- reduce: the index
@dataclass
class Decision:
    kind: str                       # "exact" | "near"
    duplicate_of: int               # id of the kept sample it duplicates
    similarity: float               # 1.0 for exact; estimated Jaccard for near


class DedupIndex:
    """Exact digests and the MinHash LSH index of kept samples; first occurrence wins."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.exact: dict[bytes, int] = {}
        self.lsh = (MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=cfg.lsh_params)
                    if cfg.near else None)
        self._rows: list[np.ndarray] = []       # kept signatures in chunks of _CHUNK rows
        self._row_of: dict[int, int] = {}       # sample id -> row in the chunks
        self.kept = 0

    _CHUNK = 4096

    def _signature(self, row: int) -> np.ndarray:
        return self._rows[row // self._CHUNK][row % self._CHUNK]

    def _store(self, sid: int, hv: np.ndarray) -> None:
        row = len(self._row_of)
        if row % self._CHUNK == 0:
            self._rows.append(np.empty((self._CHUNK, self.cfg.num_perm), np.uint32))
        self._rows[-1][row % self._CHUNK] = hv
        self._row_of[sid] = row

    def add(self, sid: int, sig: Signature) -> Decision | None:
        """Decide sample `sid` (ids increase in stream order): None = keep (and index it)."""
        if sig.exact is not None:
            first = self.exact.get(sig.exact)
            if first is not None:
                return Decision("exact", first, 1.0)
        if self.lsh is not None and sig.minhash is not None:
            probe = LeanMinHash(seed=self.cfg.seed, hashvalues=sig.minhash, scheme="affine32")
            candidates = self.lsh.query(probe)
            if candidates:
                rows = np.stack([self._signature(self._row_of[c]) for c in candidates])
                sims = (rows == sig.minhash).mean(axis=1)
                best = int(np.argmax(sims))
                if not self.cfg.verify or sims[best] >= self.cfg.threshold:
                    return Decision("near", int(candidates[best]), float(sims[best]))
            self.lsh.insert(sid, probe, check_duplication=False)
            self._store(sid, sig.minhash)
        if sig.exact is not None:
            self.exact[sig.exact] = sid
        self.kept += 1
        return None

    @property
    def bytes_per_sample(self) -> int:
        """Signature storage per kept sample (the LSH buckets come on top; see docs/benchmarks.md)."""
        return 4 * self.cfg.num_perm


def dedup_texts(texts: list[str], cfg: DedupConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """Plain strings through the same `Signer` and `DedupIndex` as `dedup`, each text a one-message
    document without media: (kept texts in order, [(removed text, the kept text it duplicates)])."""
    signer, index = Signer(cfg), DedupIndex(cfg)
    kept: dict[int, str] = {}
    dropped = []
    for sid, text in enumerate(texts):
        decision = index.add(sid, signer({"messages": [{"role": "user", "content": text}]}, {}))
        if decision is None:
            kept[sid] = text
        else:
            dropped.append((text, kept[decision.duplicate_of]))
    return list(kept.values()), dropped


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
          dry_run: bool = False, progress: bool = True, top_clusters: int = 20) -> DedupResult:
    """Stream every selected entry once; write kept samples as new shards plus a manifest, and
    reports: `reports/dedup.json` (counts per dataset, cluster sizes) and `reports/duplicates.jsonl`
    (one line per removed sample: its key, kind, and the kept key it duplicates = its cluster)."""
    cfg.validate()
    m = load_manifest(manifest)
    entries = _select(m, split, datasets)
    out = Path(out_dir)
    signer, index = Signer(cfg), DedupIndex(cfg)
    refs: list[tuple[int, str]] = []            # sample id -> (dataset index, key) of kept samples
    cluster_size: Counter = Counter()           # kept id -> number of removed duplicates
    rejects = RejectLog(out / "reports" / "dedup.rejects.jsonl")
    dup_path = out / "reports" / "duplicates.jsonl"
    dup_path.parent.mkdir(parents=True, exist_ok=True)
    counts, new_entries = [], []
    start = time.perf_counter()
    bar = tqdm(total=sum(e.num_samples for e in entries) or None, unit="sample", desc="dedup", disable=not progress)
    with dup_path.open("w", encoding="utf-8") as dups:
        for di, entry in enumerate(entries):
            c = DatasetCounts(entry.name, entry.split)
            errors = ReadErrors(rejects)
            sink = None if dry_run else ShardSink(out / "shards", f"{entry.name}-{entry.split}",
                                                  samples_per_shard, shard_bytes)
            for raw in iter_entry(entry, errors):
                bar.update()
                c.input += 1
                key = raw.get("__key__", "?")
                try:
                    meta = read_meta(raw)
                except SampleError as e:
                    c.unreadable += 1
                    rejects.add(key, "bad_sample", str(e), where=raw.get("__url__"), dataset=entry.name)
                    continue
                sid = len(refs)
                decision = index.add(sid, signer(meta, raw))
                if decision is None:
                    refs.append((di, key))
                    c.kept += 1
                    if sink is not None:
                        sink.write(raw)
                    continue
                refs.append(_REMOVED)  # removed samples keep their id slot only (never referenced)
                rep_di, rep_key = refs[decision.duplicate_of]
                cluster_size[decision.duplicate_of] += 1
                c.duplicate_of[entries[rep_di].name] += 1
                if decision.kind == "exact":
                    c.exact_removed += 1
                else:
                    c.near_removed += 1
                dups.write(json.dumps({
                    "dataset": entry.name, "split": entry.split, "key": key, "shard": raw.get("__url__"),
                    "kind": decision.kind, "similarity": round(decision.similarity, 4),
                    "duplicate_of": {"dataset": entries[rep_di].name, "split": entries[rep_di].split,
                                     "key": rep_key},
                }, ensure_ascii=False) + "\n")
            c.unreadable += errors.count
            counts.append(c)
            if sink is not None:
                sink.close()
                if sink.count:
                    new_entries.append(entry_dict(entry, urls=sink.urls(out), num_samples=sink.count))
                else:
                    log.warning("dedup: dataset %s/%s has no sample left; left out of the manifest",
                                entry.name, entry.split)
            bar.set_postfix(kept=index.kept, removed=len(refs) - index.kept, refresh=False)
    bar.close()
    rejects.close()
    seconds = time.perf_counter() - start
    largest = [{"dataset": entries[refs[sid][0]].name, "key": refs[sid][1], "duplicates": n}
               for sid, n in cluster_size.most_common(top_clusters)]
    sizes = Counter(n + 1 for n in cluster_size.values())
    manifest_out = None
    if not dry_run:
        manifest_out = write_manifest(out / "manifest.yaml", f"{m.name}-dedup", new_entries, replace=True)
    report = {
        "manifest_in": str(manifest), "manifest_out": str(manifest_out) if manifest_out else None,
        "config": asdict(cfg), "lsh_bands_rows": [index.lsh.b, index.lsh.r] if index.lsh else None,
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

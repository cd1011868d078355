"""Shared pieces of the curation verbs: reading and writing shards, manifests, reject logs, text.

Everything here streams: shards are read sample by sample through webdataset's own pipeline and
written through its `ShardWriter`; nothing holds a dataset in memory.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
import yaml

from omni.data.manifest import DatasetEntry
from omni.errors import SampleError
from omni.modalities import EXTENSIONS, PLACEHOLDERS, input_member

KIND_OF_EXT = {ext: kind for kind, exts in EXTENSIONS.items() for ext in exts}
ROLES = ("system", "user", "assistant")
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))
_SPACE = re.compile(r"\s+")


class CurationError(ValueError):
    """A curation input cannot be used at all (file unreadable, bad option); names file/line/field."""


@dataclass
class Reject(Exception):
    """One sample refused: `code` is a short category for counting, `reason` says what and where."""
    code: str
    reason: str

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


# ---------------------------------------------------------------- names and text
def safe_name(name: str) -> str:
    """`name` with anything outside [A-Za-z0-9_-] replaced by '_' (tar keys must not contain dots)."""
    return _SAFE.sub("_", name).strip("_") or "_"


def check_name(name: str, what: str = "dataset name") -> str:
    if not name or _SAFE.search(name):
        raise CurationError(f"{what} {name!r}: use only letters, digits, '_' and '-' "
                            "(it becomes part of tar keys and shard file names)")
    return name


def strip_placeholders(text: str) -> str:
    return _PLACEHOLDER_RE.sub(" ", text)


def conversation_text(messages: list[dict], roles: tuple[str, ...] = ROLES) -> str:
    """Contents of the messages with the given roles, placeholders removed, one per line."""
    return "\n".join(strip_placeholders(str(m.get("content", ""))) for m in messages if m.get("role") in roles)


def normalise(text: str) -> str:
    """Unicode NFKC, lowercase, whitespace runs collapsed to one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def digest(*parts: bytes) -> bytes:
    """16-byte BLAKE2b digest of the parts (length-prefixed, so part boundaries matter)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


# ---------------------------------------------------------------- samples in shards
def media_members(raw: dict) -> list[tuple[str, int, str, bytes]]:
    """(kind, index, member name, bytes) of every input medium, per kind in placeholder order (the
    loader's rule, `omni.modalities.input_member`: the spoken answer `answer.wav` is not one of them)."""
    out = [(kind[0], kind[1], key, value) for key, value in raw.items()
           if not key.startswith("_") and (kind := input_member(key))]
    order = {k: i for i, k in enumerate(EXTENSIONS)}
    return sorted(out, key=lambda m: (order[m[0]], m[1], m[2]))


class Unreadable(Exception):
    """A shard member webdataset could not read (yielded in place of a sample, then skipped)."""


def shard_urls(entry: DatasetEntry) -> list[str]:
    """The entry's brace pattern expanded, in order (a shard's index is its place here)."""
    return list(wds.SimpleShardList(entry.urls).urls)


def read_shard(url: str) -> Iterator[dict | Unreadable]:
    """Every raw sample of one shard in order; a shard whose tar cannot be read to its end yields the
    samples before the damage, then one `Unreadable` (`unreadable_shard`: the same on Ray)."""
    errors: list[Exception] = []
    pipe = wds.DataPipeline(wds.SimpleShardList([url]),
                            wds.tarfile_to_samples(handler=lambda e: errors.append(e) or True))
    yield from pipe
    if errors:
        yield unreadable_shard(url, errors[0])


def unreadable_shard(url: str, error: Exception) -> Unreadable:
    """One line for a damaged shard: where, and the tar reader's own words (without the stream
    and url webdataset appends to them, or the retry note Ray Data adds on a line of its own)."""
    what = str(error.args[0]).splitlines()[0] if error.args else type(error).__name__
    return Unreadable(f"shard {url}: {what} (the samples before the damage are kept; rewrite or drop the shard)")


def shard_results(di: int, si: int, url: str, fn=None, limit: int | None = None) -> Iterator[tuple]:
    """(rank, raw | Unreadable, fn(raw) or the Reject/SampleError it raised) for one shard, its first
    `limit` samples with a limit; the map step of every verb over shards. rank = (dataset index,
    shard index, position), -1 for errors."""
    p = 0
    for item in read_shard(url):
        if limit is not None and p >= limit:
            return
        if isinstance(item, Unreadable):
            yield (di, si, -1), item, None
            continue
        try:
            result = fn(item) if fn is not None else None
        except (Reject, SampleError) as e:
            result = e
        yield (di, si, p), item, result
        p += 1


def map_samples(entries: list[DatasetEntry], fn=None, limit: int | None = None) -> Iterator[tuple]:
    """In-process `shard_results` over every shard of every entry, in manifest order, the first
    `limit` samples of each entry with a limit (a `RayBackend` gives the same sequence from its
    workers, up to the limit)."""
    for di, entry in enumerate(entries):
        left = limit
        for si, url in enumerate(shard_urls(entry)):
            if left is not None and left <= 0:
                break
            for item in shard_results(di, si, url, fn, left):
                left = None if left is None else left - (item[0][2] >= 0)
                yield item


# ---------------------------------------------------------------- writing shards
class ShardSink:
    """Samples -> `{folder}/{stem}-{000000..}.tar` through webdataset's ShardWriter (by count and size).

    Stale shards of the same stem are removed first. Opened lazily, so a set that receives no
    sample writes no file; `urls(relative_to)` is the brace pattern a manifest entry needs."""

    def __init__(self, folder: Path, stem: str, max_count: int = 1000, max_bytes: float = 5e8):
        self.folder, self.stem = Path(folder), stem
        self.max_count, self.max_bytes = max_count, max_bytes
        self.writer: wds.ShardWriter | None = None
        self._num_shards: int | None = None
        self.count = 0
        self.bytes = 0

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob(f"{self.stem}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            old.unlink()
        self.writer = wds.ShardWriter(str(self.folder / f"{self.stem}-%06d.tar"), maxcount=self.max_count,
                                      maxsize=self.max_bytes, verbose=0, mtime=0.0)

    def write(self, sample: dict) -> None:
        if "." in sample["__key__"]:  # webdataset would read KEY.X.json back as key KEY, member X.json
            raise CurationError(f"sample key {sample['__key__']!r} has a dot; webdataset ends a key at the first "
                                "dot of a member's name, so keys are letters, digits, _ and -")
        if self.writer is None:
            self._open()
        self.writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("_")})
        self.count += 1

    def close(self) -> None:
        if self.writer is not None and self._num_shards is None:
            self._num_shards = self.writer.shard  # ShardWriter.close() deletes this attribute
            self.writer.close()
            self.bytes = sum(p.stat().st_size for p in self.shards())

    @property
    def num_shards(self) -> int:
        if self._num_shards is not None:
            return self._num_shards
        return self.writer.shard if self.writer is not None else 0

    def shards(self) -> list[Path]:
        return [self.folder / f"{self.stem}-{i:06d}.tar" for i in range(self.num_shards)]

    def urls(self, relative_to: Path) -> str:
        rel = Path(self.folder).resolve().relative_to(Path(relative_to).resolve())
        return f"{rel.as_posix()}/{self.stem}-{{000000..{self.num_shards - 1:06d}}}.tar"


def entry_dict(entry: DatasetEntry, **changes) -> dict:
    d = {"name": entry.name, "split": entry.split, "urls": entry.urls, "num_samples": entry.num_samples,
         "weight": entry.weight, "modalities": list(entry.modalities), "task": entry.task}
    d.update(changes)
    return d


def write_manifest(path: Path, name: str, entries: list[dict], replace: bool = False) -> Path:
    """Write (or update) a manifest YAML. With `replace=False` an existing file's entries are kept
    unless an entry with the same (name, split) is given, which takes its place."""
    path = Path(path)
    old: list[dict] = []
    if path.is_file() and not replace:
        spec = yaml.safe_load(path.read_text()) or {}
        name = spec.get("name", name)
        old = list(spec.get("datasets") or [])
    new_keys = {(e["name"], e.get("split", "train")) for e in entries}
    kept = [e for e in old if (e.get("name"), e.get("split", "train")) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "datasets": kept + [_plain(e) for e in entries]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, allow_unicode=True))
    return path


def drop_manifest_entry(path: Path, name: str, split: str) -> None:
    """Remove the (name, split) entry from an existing manifest YAML, if there is one."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    datasets = [e for e in spec.get("datasets") or [] if (e.get("name"), e.get("split", "train")) != (name, split)]
    if len(datasets) != len(spec.get("datasets") or []):
        spec["datasets"] = datasets
        Path(path).write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, allow_unicode=True))


def _plain(entry: dict) -> dict:
    out = {k: entry[k] for k in ("name", "split", "urls", "num_samples", "weight", "modalities", "task")
           if k in entry}
    if out.get("task") is None:
        out.pop("task", None)
    if "weight" in out:
        out["weight"] = float(round(out["weight"], 6))
    return out


# ---------------------------------------------------------------- reject reports
@dataclass
class RejectLog:
    """Appends one JSON line per refused sample ({key, where, code, reason}) and counts codes."""
    path: Path | None
    counts: Counter = field(default_factory=Counter)
    by_dataset: dict = field(default_factory=dict)

    def __post_init__(self):
        self._fh = None
        if self.path is not None:
            self.path = Path(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("w", encoding="utf-8")

    def add(self, key: str, code: str, reason: str, where: str | None = None, dataset: str | None = None) -> None:
        self.counts[code] += 1
        if dataset is not None:
            self.by_dataset.setdefault(dataset, Counter())[code] += 1
        if self._fh is not None:
            rec = {"key": key, "code": code, "reason": reason}
            if where:
                rec["where"] = where
            if dataset:
                rec["dataset"] = dataset
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    return path

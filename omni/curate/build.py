"""`omni data build`: common raw formats -> validated WebDataset shards + a manifest entry + rejects.

Formats (`--format`): llava, sharegpt, asr, captions; see formats.py.

Every sample is validated (roles: optional system, then user/assistant alternating, ending with
a non-empty assistant reply; placeholder count = media count per kind; media decode with the
loader's own decoders) and written, or refused with (key, where, code, reason) in a rejects file.
Nothing is dropped silently and one bad record never stops a build (an unparseable JSON *array*
does: it cannot be resynchronised, and the error names the file and line).

Map/sink structure (docs/curation.md, "Beyond one machine"): `iter_records` (source) ->
`convert_record` (a pure function of one record: raw sample dict or `Reject`) -> `ShardSink` (sink). The Ray
path (`--ray`, omni/curate/ray_backend.py) maps `convert_record` over blocks of records in Ray Data's
write tasks, which also write the samples (omni/curate/ray_write.py); the rejects and counts are folded in order.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from encoders import VideoSamplingConfig, read_video
from omni.curate.common import (
    KIND_OF_EXT,
    CurationError,
    Reject,
    RejectLog,
    ShardSink,
    check_name,
    drop_manifest_entry,
    media_members,
    strip_placeholders,
    write_json,
    write_manifest,
)
from omni.curate.formats import (
    DEFAULT_TASK,
    FORMATS,
    draft,
    is_table,
    iter_caption_folder,
    iter_json,
    iter_table,
    unsupported_media,
)
from omni.data.loader import decode_sample
from omni.errors import SampleError
from omni.modalities import EXTENSIONS, PLACEHOLDERS

log = logging.getLogger(__name__)

_PROBE_VIDEO = VideoSamplingConfig(fps=1.0, max_frames=1)  # open the video and decode its first frame


@dataclass
class BuildConfig:
    format: str
    inputs: list[str]
    out_dir: str
    name: str
    split: str = "train"
    media_root: str | None = None       # media paths are relative to this (default: each input's folder)
    task: str | None = None             # default per format (DEFAULT_TASK)
    source: str | None = None           # json "source"; default: the dataset name
    weight: float = 1.0                 # mixture weight written into the manifest entry
    prompt: str | None = None           # asr / captions user turn (must hold the placeholder, or gets one)
    system: str | None = None           # optional system message prepended to every sample
    samples_per_shard: int = 5000
    shard_bytes: float = 5e8
    check_media: bool = True            # decode every medium (off: existence and extension only)
    manifest_name: str | None = None    # manifest `name` when the manifest is new (default: out folder)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise CurationError(f"--format {self.format!r}: choose one of {list(FORMATS)}")
        check_name(self.name)
        check_name(self.split, "split")
        if not self.inputs:
            raise CurationError("no input given")
        for p in self.inputs:
            if not Path(p).exists():
                raise CurationError(f"input {p}: no such file or folder")
            if Path(p).is_dir() and self.format != "captions":
                raise CurationError(f"input {p} is a folder; only --format captions reads folders")
        if self.media_root is not None and not Path(self.media_root).is_dir():
            raise CurationError(f"--media-root {self.media_root}: no such folder")
        if self.weight <= 0 or self.samples_per_shard < 1 or self.shard_bytes <= 0:
            raise CurationError("need --weight > 0, --samples-per-shard >= 1 and --shard-bytes > 0")


@dataclass
class BuildResult:
    manifest: Path | None
    written: int
    rejected: int
    reasons: dict[str, int]
    shards: int
    seconds: float
    rejects_file: Path
    report_file: Path
    modalities: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return (self.written + self.rejected) / max(self.seconds, 1e-9)


def iter_records(cfg: BuildConfig) -> Iterator[tuple[str, object, Path]]:
    """(where, record or Reject, media root) over every input of the build, in order."""
    for inp in cfg.inputs:
        path = Path(inp)
        root = Path(cfg.media_root) if cfg.media_root else (path if path.is_dir() else path.parent)
        if path.is_dir():
            records = iter_caption_folder(path)
        elif cfg.format == "asr" and is_table(path):
            records = iter_table(path, ("audio", "text"))
        elif cfg.format == "captions" and is_table(path):
            records = iter_table(path, ("file", "caption"))
        else:
            records = iter_json(path)
        for where, rec in records:
            yield where, rec, root


# ---------------------------------------------------------------- validation
def check_roles(messages: list[dict]) -> None:
    """Optional leading system, then user/assistant alternating from user, ending with a non-empty
    assistant reply; every turn a non-empty string."""
    body = messages[1:] if messages and messages[0].get("role") == "system" else messages
    if not body:
        raise Reject("no_turns", "no user/assistant turns")
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise Reject("bad_field", f"messages[{i}].content must be a string")
        if m.get("role") not in ("system", "user", "assistant"):
            raise Reject("bad_role", f"messages[{i}].role = {m.get('role')!r}")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise Reject("bad_role_order", f"messages[{i + offset}] is {m['role']!r} where {want!r} was expected "
                                           "(optional system, then user/assistant alternating)")
        if want == "assistant" and not strip_placeholders(m["content"]).strip():
            raise Reject("empty_reply", f"messages[{i + offset}]: empty assistant reply")
        if want == "user" and not m["content"].strip():
            raise Reject("empty_turn", f"messages[{i + offset}]: empty user turn")
    if body[-1]["role"] != "assistant":
        raise Reject("no_reply", f"messages[{len(messages) - 1}]: the conversation ends with a user turn "
                                 "(nothing to learn from)")


def check_placeholders(messages: list[dict], counts: dict[str, int]) -> None:
    text = "".join(m["content"] for m in messages)
    for kind, ph in PLACEHOLDERS.items():
        n_ph, n_media = text.count(ph), counts.get(kind, 0)
        if n_ph != n_media:
            raise Reject("placeholder_mismatch", f"{n_ph} '{ph}' placeholder(s) but {n_media} {kind} file(s)")


def check_media(raw: dict) -> None:
    """Decode every medium with the loader's decoders (images, audio) and decord (video, first frame)."""
    try:
        decode_sample(raw)
    except SampleError as e:
        raise Reject("undecodable_media", str(e)) from None
    for kind, _, key, value in media_members(raw):
        if kind == "video":
            try:
                read_video(value, _PROBE_VIDEO)
            except ValueError as e:
                raise Reject("undecodable_media", f"field {key!r}: {e}") from None


def _read_media(path: str, root: Path, where: str) -> tuple[str, bytes]:
    p = Path(path)
    full = p if p.is_absolute() else root / p
    ext = full.suffix.lower().lstrip(".")
    if ext not in KIND_OF_EXT:
        raise unsupported_media(str(full))
    try:
        data = full.read_bytes()
    except FileNotFoundError:
        raise Reject("missing_media", f"{where}: media file not found: {full} (relative paths resolve "
                                      f"against --media-root {root})") from None
    except OSError as e:
        raise Reject("missing_media", f"{where}: cannot read {full}: {e}") from None
    return ("jpg" if ext == "jpeg" else ext), data


def convert_record(rec, where: str, root: Path, key: str, cfg: BuildConfig) -> dict:
    """One input record -> a validated WebDataset sample dict (`__key__`, `json`, media), or Reject.

    Pure apart from reading the media files: the map step of a build."""
    fmt = cfg.format
    messages, media_paths, rid = draft(fmt, rec, where, cfg.prompt, cfg.system)
    check_roles(messages)
    counts = {k: len(v) for k, v in media_paths.items()}
    check_placeholders(messages, counts)
    meta = {"messages": messages, "task": cfg.task or DEFAULT_TASK[fmt], "source": cfg.source or cfg.name,
            "origin": where}
    if rid is not None:
        meta["id"] = rid
    raw = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    for kind, paths in media_paths.items():
        for i, path in enumerate(paths):
            ext, data = _read_media(path, root, where)
            if KIND_OF_EXT[ext] != kind:
                raise Reject("wrong_media_kind", f"{where}: {path} is {KIND_OF_EXT[ext]}, listed as {kind}")
            raw[ext if len(paths) == 1 else f"{i}.{ext}"] = data
    if cfg.check_media:
        check_media(raw)
    return raw


def modalities_of(raw: dict) -> set[str]:
    return {kind for kind, _, _, _ in media_members(raw)}


# ---------------------------------------------------------------- the verb
def keyed_records(cfg: BuildConfig) -> Iterator[tuple[object, str, Path, str]]:
    """(record or Reject, where, media root, key) of every record in input order, streaming."""
    return ((rec, where, root, f"{cfg.name}-{i:08d}") for i, (where, rec, root) in enumerate(iter_records(cfg)))


def converted(cfg: BuildConfig) -> Iterator[tuple[str, str, dict | Reject]]:
    """(key, where, sample or Reject) of every record in input order, converted here, streaming."""
    for rec, where, root, key in keyed_records(cfg):
        try:
            yield key, where, convert_record(rec, where, root, key, cfg)
        except Reject as r:
            yield key, where, r


def build(cfg: BuildConfig, progress: bool = True, backend=None) -> BuildResult:
    """Convert, validate and shard every record; write rejects, a report and the manifest entry.
    `backend`: None converts here; a `RayBackend` converts on Ray and writes through Ray Data's write
    API (records listed a window at a time, converted and written by the write tasks; same shards
    and reports)."""
    cfg.validate()
    out = Path(cfg.out_dir)
    stem = f"{cfg.name}-{cfg.split}"
    datasink = None
    if backend is not None:
        datasink = backend.datasink(out / "shards", partial(built_stem, stem=stem), cfg.samples_per_shard,
                                    cfg.shard_bytes)
    sink = datasink.sink(stem) if datasink else ShardSink(out / "shards", stem, cfg.samples_per_shard,
                                                          cfg.shard_bytes)
    rejects_file = out / "reports" / f"{stem}.rejects.jsonl"
    rejects = RejectLog(rejects_file)
    modalities: set[str] = set()
    start = time.perf_counter()
    bar = tqdm(unit="rec", desc=f"build {cfg.name}", disable=not progress)

    def fold(results) -> None:
        """The build's bookkeeping over (key, where, sample or Reject) in input order: rejects,
        modalities, and (in-process) the samples written."""
        for key, where, raw in results:
            if isinstance(raw, Reject):
                rejects.add(key, raw.code, raw.reason, where=where)
            else:
                sink.write(raw)
                modalities.update(modalities_of(raw))
            bar.update()
            if (sink.count + rejects.total) % 256 == 0:
                bar.set_postfix(ok=sink.count, rejected=rejects.total, refresh=False)

    try:
        if datasink is None:
            fold(converted(cfg))
        else:
            backend.write_records(keyed_records(cfg), partial(convert_record, cfg=cfg), datasink,
                                  lambda pairs: fold((key, where, sample) for (_, where, _, key), sample in pairs))
    finally:
        bar.close()
        sink.close()
        rejects.close()
    seconds = time.perf_counter() - start
    manifest = out / "manifest.yaml"
    order = [k for k in EXTENSIONS if k in modalities]
    entry = {"name": cfg.name, "split": cfg.split, "urls": sink.urls(out) if sink.count else "",
             "num_samples": sink.count, "weight": cfg.weight, "modalities": order,
             "task": cfg.task or DEFAULT_TASK[cfg.format]}
    if sink.count:
        write_manifest(manifest, cfg.manifest_name or safe_manifest_name(out), [entry])
    else:
        log.warning("build %s: no sample passed validation; no shards, no manifest entry (see %s)",
                    cfg.name, rejects_file)
        for stale in (out / "shards").glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            stale.unlink()
        if manifest.is_file():  # an earlier build's entry would point at the shards just removed
            drop_manifest_entry(manifest, cfg.name, cfg.split)
        manifest = None
    report = {"dataset": cfg.name, "split": cfg.split, "format": cfg.format, "inputs": list(cfg.inputs),
              "written": sink.count, "rejected": rejects.total, "reasons": dict(rejects.counts.most_common()),
              "shards": sink.num_shards, "bytes": sink.bytes, "modalities": order, "seconds": round(seconds, 3),
              "samples_per_s": round((sink.count + rejects.total) / max(seconds, 1e-9), 1),
              "manifest": str(manifest) if manifest else None, "rejects_file": str(rejects_file)}
    report_file = write_json(out / "reports" / f"{stem}.build.json", report)
    return BuildResult(manifest, sink.count, rejects.total, dict(rejects.counts), sink.num_shards, seconds,
                       rejects_file, report_file, order)


def built_stem(rank, raw, result, stem: str) -> str | None:
    """--ray, on the workers: every converted sample goes to the build's one set, a Reject nowhere."""
    return stem if isinstance(result, dict) else None


def safe_manifest_name(out: Path) -> str:
    return Path(out).resolve().name or "curated"


def format_result(r: BuildResult) -> str:
    lines = [f"written {r.written} samples in {r.shards} shard(s), rejected {r.rejected} "
             f"({r.samples_per_s:.0f} samples/s)"]
    for code, n in sorted(r.reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected {n:>7}  {code}")
    lines.append(f"rejects: {r.rejects_file}")
    lines.append(f"report:  {r.report_file}")
    if r.manifest:
        lines.append(f"manifest: {r.manifest}")
    return "\n".join(lines)


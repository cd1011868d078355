"""`omni data build`: common raw formats -> validated WebDataset shards + a manifest entry + rejects.

Formats (`--format`):
    llava     JSON array or JSONL of {"id", "image"|"images"|"video"|"videos"|"audio"|"audios",
              "conversations": [{"from": "human"|"gpt"|"system", "value"}]}. LLaVA convention: a
              record with media but no placeholder of that kind gets one per medium prepended to its
              first user turn; LLaVA-Video records (a video, no image, `<image>` in the text) have
              their `<image>` placeholders read as `<video>`.
    sharegpt  JSON array or JSONL of {"conversations": [{"from", "value"}]} or {"messages":
              [{"role", "content"}]}, optional "system"; text chat (media keys as for llava are
              accepted, but placeholders must already be right).
    asr       JSONL {"audio_filepath"|"audio"|"path"|"file", "text"|"transcript"|"sentence"} or TSV
              "path<TAB>transcript" -> user `--prompt` (default "<audio>\\nTranscribe the audio."),
              assistant = transcript.
    captions  a folder of media files with a sidecar caption `NAME.txt` next to each `NAME.jpg` (or
              .mp4/.wav/...), or a JSONL {"file", "caption"} / TSV "file<TAB>caption" index ->
              user `--prompt` (default "<image>\\nDescribe the image." by kind), assistant = caption.

Every sample is validated (roles: optional system, then user/assistant alternating, ending with
a non-empty assistant reply; placeholder count = media count per kind; media decode with the
loader's own decoders) and written, or refused with (key, where, code, reason) in a rejects file.
Nothing is dropped silently and one bad record never stops a build (an unparseable JSON *array*
does: it cannot be resynchronised, and the error names the file and line).

Map/sink structure (ARCHITECTURE §7): `iter_records` (source) -> `convert_record` (a pure function
of one record: raw sample dict or `Reject`) -> `ShardSink` (sink). A Ray path maps
`convert_record` over records and writes with `write_webdataset`; nothing else changes.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from encoders import VideoSamplingConfig, read_video_frames
from omni.curate.common import (
    KIND_OF_EXT,
    PLACEHOLDERS,
    CurationError,
    Reject,
    RejectLog,
    ShardSink,
    check_name,
    drop_manifest_entry,
    strip_placeholders,
    write_json,
    write_manifest,
)
from omni.data.loader import EXTENSIONS, decode_sample
from omni.errors import SampleError

log = logging.getLogger(__name__)

FORMATS = ("llava", "sharegpt", "asr", "captions")
DEFAULT_TASK = {"llava": "vqa", "sharegpt": "chat", "asr": "asr", "captions": "caption"}
DEFAULT_PROMPT = {
    "asr": "<audio>\nTranscribe the audio.",
    "image": "<image>\nDescribe the image.",
    "video": "<video>\nDescribe the video.",
    "audio": "<audio>\nDescribe the audio.",
}
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "chatgpt": "assistant", "system": "system"}
MEDIA_KEYS = {"image": ("image", "images"), "video": ("video", "videos"), "audio": ("audio", "audios")}
ASR_PATH_KEYS = ("audio_filepath", "audio", "path", "file", "wav")
ASR_TEXT_KEYS = ("text", "transcript", "sentence", "transcription")
CAPTION_FILE_KEYS = ("file", "path", "image", "video", "audio", "media")
CAPTION_TEXT_KEYS = ("caption", "text")
_CHUNK = 1 << 20
_MAX_RECORD = 256 << 20  # a single JSON record larger than this is an error, not a reason to read on
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


# ---------------------------------------------------------------- reading records
def iter_json(path: str | Path) -> Iterator[tuple[str, object]]:
    """("file:line", record) for a JSON array (streamed element by element) or JSONL file.

    A JSONL line that does not parse yields a `Reject` in place of the record; an invalid JSON
    array raises CurationError naming the file and line (no way to find the next element)."""
    path = Path(path)
    with path.open("rb") as f:
        while (ch := f.read(1)) and ch.isspace():
            pass
        f.seek(0)
        if ch == b"[":
            try:
                with path.open(encoding="utf-8") as text:
                    yield from _iter_array(text, path)
            except UnicodeDecodeError as e:
                raise CurationError(f"{path}: not UTF-8 ({e}); re-encode the file") from None
            return
        for lineno, line in enumerate(f, 1):  # bytes: a badly encoded line is one reject, not a crash
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line.decode("utf-8"))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                yield f"{path}:{lineno}", Reject("bad_json", f"{path}:{lineno}: not valid UTF-8 JSON ({e})")


def _iter_array(f, path: Path) -> Iterator[tuple[str, object]]:
    decoder = json.JSONDecoder()
    buf, pos, line, eof = f.read(_CHUNK), 0, 1, False

    def skip(chars: str) -> None:
        nonlocal pos, line
        while pos < len(buf) and buf[pos] in chars:
            line += buf[pos] == "\n"
            pos += 1

    def fill() -> None:
        nonlocal buf, pos, eof
        more = f.read(max(_CHUNK, len(buf)))  # doubling: a large record costs O(size), not O(size^2)
        eof = not more
        buf, pos = buf[pos:] + more, 0

    skip(" \t\r\n")
    pos += 1  # the '['
    while True:
        skip(" \t\r\n,")
        if pos >= len(buf):
            if eof:
                raise CurationError(f"{path}:{line}: JSON array is not closed with ']'")
            fill()
            continue
        if buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            if not eof and len(buf) - pos < _MAX_RECORD:
                fill()
                continue
            raise CurationError(f"{path}:{line}: invalid JSON in the array ({e.msg}); fix the file "
                                "or convert it to JSONL, where a bad line is only rejected") from None
        yield f"{path}:{line}", obj
        line += buf.count("\n", pos, end)
        pos = end


def iter_table(path: str | Path, names: tuple[str, str]) -> Iterator[tuple[str, object]]:
    """TSV rows "a<TAB>b" as {names[0]: a, names[1]: b}; a header row naming the columns is skipped."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace", newline="") as f:  # U+FFFD is caught by reweight
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                yield f"{path}:{lineno}", Reject(
                    "bad_row", f"{path}:{lineno}: expected 2 tab-separated columns, got {len(row)}")
                continue
            if lineno == 1 and row[0].strip().lower() in (*ASR_PATH_KEYS, *CAPTION_FILE_KEYS):
                continue
            yield f"{path}:{lineno}", {names[0]: row[0].strip(), names[1]: "\t".join(row[1:]).strip()}


def _is_table(path: Path) -> bool:
    return path.suffix.lower() in (".tsv", ".txt", ".csv")


def iter_caption_folder(folder: str | Path) -> Iterator[tuple[str, object]]:
    """Media files under `folder` (sorted, recursive) with the caption of their sidecar NAME.txt."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() == ".txt":
                continue  # hidden files; captions
            if p.suffix.lower().lstrip(".") not in KIND_OF_EXT:
                yield str(p), _unsupported(str(p))  # reported, never silently dropped
                continue
            side = p.with_suffix(".txt")
            if not side.is_file():
                yield str(p), Reject("missing_caption", f"{p}: no caption file {side.name} beside it")
                continue
            yield str(p), {"file": str(p), "caption": side.read_text(encoding="utf-8").strip()}


def iter_records(cfg: BuildConfig) -> Iterator[tuple[str, object, Path]]:
    """(where, record or Reject, media root) over every input of the build, in order."""
    for inp in cfg.inputs:
        path = Path(inp)
        root = Path(cfg.media_root) if cfg.media_root else (path if path.is_dir() else path.parent)
        if path.is_dir():
            records = iter_caption_folder(path)
        elif cfg.format == "asr" and _is_table(path):
            records = iter_table(path, ("audio", "text"))
        elif cfg.format == "captions" and _is_table(path):
            records = iter_table(path, ("file", "caption"))
        else:
            records = iter_json(path)
        for where, rec in records:
            yield where, rec, root


# ---------------------------------------------------------------- records -> messages + media paths
def _field(rec: dict, keys: tuple[str, ...], where: str, what: str):
    for k in keys:
        if k in rec and rec[k] not in (None, ""):
            return rec[k]
    raise Reject("missing_field", f"{where}: no {what} field (looked for {list(keys)})")


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise Reject("bad_field", f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _media_lists(rec: dict, where: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind, keys in MEDIA_KEYS.items():
        for k in keys:
            value = rec.get(k)
            if value in (None, "", []):
                continue
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
                raise Reject("bad_field", f"{where}: field {k!r} must be a path or a list of paths")
            out.setdefault(kind, []).extend(items)
    return out


def conversation_messages(rec: dict, where: str) -> list[dict]:
    """ShareGPT/LLaVA `conversations` or OpenAI-style `messages` -> [{role, content}]."""
    if not isinstance(rec, dict):
        raise Reject("bad_record", f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("conversations"), list):
        turns, rkey, ckey, name = rec["conversations"], "from", "value", "conversations"
    elif isinstance(rec.get("messages"), list):
        turns, rkey, ckey, name = rec["messages"], "role", "content", "messages"
    else:
        raise Reject("missing_field", f"{where}: no 'conversations' (or 'messages') list")
    messages = []
    if rec.get("system"):
        messages.append({"role": "system", "content": _text(rec["system"], where, "system")})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or rkey not in turn or ckey not in turn:
            raise Reject("bad_field", f"{where}: {name}[{i}] needs {rkey!r} and {ckey!r}")
        role = ROLE_MAP.get(str(turn[rkey]).lower())
        if role is None:
            raise Reject("bad_role", f"{where}: {name}[{i}].{rkey} = {turn[rkey]!r}; known: {sorted(ROLE_MAP)}")
        messages.append({"role": role, "content": _text(turn[ckey], where, f"{name}[{i}].{ckey}")})
    return messages


def _llava_placeholders(messages: list[dict], media: dict[str, list[str]]) -> list[dict]:
    text = "".join(m["content"] for m in messages)
    if media.get("video") and not media.get("image") and "<image>" in text and "<video>" not in text:
        messages = [{**m, "content": m["content"].replace("<image>", "<video>")} for m in messages]
        text = text.replace("<image>", "<video>")
    prefix = "".join((PLACEHOLDERS[k] + "\n") * len(media[k]) for k in media if PLACEHOLDERS[k] not in text)
    if prefix:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is not None:
            messages = list(messages)
            messages[first_user] = {**messages[first_user], "content": prefix + messages[first_user]["content"]}
    return messages


def _with_placeholder(prompt: str, kind: str) -> str:
    return prompt if PLACEHOLDERS[kind] in prompt else f"{PLACEHOLDERS[kind]}\n{prompt}"


def draft(fmt: str, rec, where: str, cfg: BuildConfig) -> tuple[list[dict], dict[str, list[str]], str | None]:
    """One record -> (messages, media paths by kind, original id)."""
    if isinstance(rec, Reject):
        raise rec
    if not isinstance(rec, dict):
        raise Reject("bad_record", f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    rid = rec.get("id")
    if fmt in ("llava", "sharegpt"):
        messages = conversation_messages(rec, where)
        media = _media_lists(rec, where)
        if fmt == "llava":
            messages = _llava_placeholders(messages, media)
    elif fmt == "asr":
        path = _text(_field(rec, ASR_PATH_KEYS, where, "audio path"), where, "audio path")
        text = _text(_field(rec, ASR_TEXT_KEYS, where, "transcript"), where, "transcript")
        prompt = _with_placeholder(cfg.prompt or DEFAULT_PROMPT["asr"], "audio")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        media = {"audio": [path]}
    else:  # captions
        path = _text(_field(rec, CAPTION_FILE_KEYS, where, "media file"), where, "media file")
        text = _text(_field(rec, CAPTION_TEXT_KEYS, where, "caption"), where, "caption")
        kind = KIND_OF_EXT.get(Path(path).suffix.lower().lstrip("."))
        if kind is None:
            raise _unsupported(path)
        prompt = _with_placeholder(cfg.prompt or DEFAULT_PROMPT[kind], kind)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        media = {kind: [path]}
    if cfg.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": cfg.system}, *messages]
    return messages, media, None if rid is None else str(rid)


def _unsupported(path: str) -> Reject:
    accepted = ", ".join(f"{k}: {'/'.join(v)}" for k, v in EXTENSIONS.items())
    return Reject("unsupported_media", f"{path}: extension not a sample media type ({accepted})")


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
    for key, value in raw.items():
        if key.rpartition(".")[2] in EXTENSIONS["video"]:
            try:
                read_video_frames(value, _PROBE_VIDEO)
            except ValueError as e:
                raise Reject("undecodable_media", f"field {key!r}: {e}") from None


def _read_media(path: str, root: Path, where: str) -> tuple[str, bytes]:
    p = Path(path)
    full = p if p.is_absolute() else root / p
    ext = full.suffix.lower().lstrip(".")
    if ext not in KIND_OF_EXT:
        raise _unsupported(str(full))
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
    messages, media_paths, rid = draft(fmt, rec, where, cfg)
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
    return {KIND_OF_EXT[k.rpartition(".")[2]] for k in raw if k.rpartition(".")[2] in KIND_OF_EXT}


# ---------------------------------------------------------------- the verb
def build(cfg: BuildConfig, progress: bool = True) -> BuildResult:
    """Convert, validate and shard every record; write rejects, a report and the manifest entry."""
    cfg.validate()
    out = Path(cfg.out_dir)
    stem = f"{cfg.name}-{cfg.split}"
    sink = ShardSink(out / "shards", stem, cfg.samples_per_shard, cfg.shard_bytes)
    rejects_file = out / "reports" / f"{stem}.rejects.jsonl"
    rejects = RejectLog(rejects_file)
    modalities: set[str] = set()
    start = time.perf_counter()
    bar = tqdm(unit="rec", desc=f"build {cfg.name}", disable=not progress)
    try:
        for index, (where, rec, root) in enumerate(iter_records(cfg)):
            key = f"{cfg.name}-{index:08d}"
            try:
                raw = convert_record(rec, where, root, key, cfg)
            except Reject as r:
                rejects.add(key, r.code, r.reason, where=where)
            else:
                sink.write(raw)
                modalities |= modalities_of(raw)
            bar.update()
            if index % 256 == 0:
                bar.set_postfix(ok=sink.count, rejected=rejects.total, refresh=False)
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


"""The input formats of `omni data build`: reading records from files, and one record -> messages
plus media paths (`draft`). Validation, media reading and sharding are build.py's.

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
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from omni.curate.common import KIND_OF_EXT, CurationError, Reject
from omni.data.loader import content_text
from omni.errors import SampleError
from omni.modalities import EXTENSIONS, PLACEHOLDERS

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


def is_table(path: Path) -> bool:
    """A tab-separated index (asr, captions) rather than JSON."""
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
                yield str(p), unsupported_media(str(p))  # reported, never silently dropped
                continue
            side = p.with_suffix(".txt")
            if not side.is_file():
                yield str(p), Reject("missing_caption", f"{p}: no caption file {side.name} beside it")
                continue
            yield str(p), {"file": str(p), "caption": side.read_text(encoding="utf-8").strip()}


# ---------------------------------------------------------------- records -> messages + media paths
def _field(rec: dict, keys: tuple[str, ...], where: str, what: str):
    for k in keys:
        if k in rec and rec[k] not in (None, ""):
            return rec[k]
    raise Reject("missing_field", f"{where}: no {what} field (looked for {list(keys)})")


def _text(value, where: str, name: str) -> str:
    """A turn's text: a string, or typed content parts (OpenAI / transformers form) read as training reads them."""
    if isinstance(value, list):
        try:
            return content_text(value, where, name)
        except SampleError as e:
            raise Reject("bad_field", str(e)) from None
    if not isinstance(value, str):
        raise Reject("bad_field", f"{where}: field {name!r} must be a string or a list of typed parts, "
                                  f"got {type(value).__name__}")
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


def draft(fmt: str, rec, where: str, prompt: str | None = None, system: str | None = None
          ) -> tuple[list[dict], dict[str, list[str]], str | None]:
    """One record -> (messages, media paths by kind, original id). `prompt`: the asr / captions user
    turn (default per kind); `system`: prepended when the record has none."""
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
        prompt = _with_placeholder(prompt or DEFAULT_PROMPT["asr"], "audio")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        media = {"audio": [path]}
    else:  # captions
        path = _text(_field(rec, CAPTION_FILE_KEYS, where, "media file"), where, "media file")
        text = _text(_field(rec, CAPTION_TEXT_KEYS, where, "caption"), where, "caption")
        kind = KIND_OF_EXT.get(Path(path).suffix.lower().lstrip("."))
        if kind is None:
            raise unsupported_media(path)
        prompt = _with_placeholder(prompt or DEFAULT_PROMPT[kind], kind)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        media = {kind: [path]}
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return messages, media, None if rid is None else str(rid)


def unsupported_media(path: str) -> Reject:
    """The reject of a file whose extension is no sample media type (listing the accepted ones)."""
    accepted = ", ".join(f"{k}: {'/'.join(v)}" for k, v in EXTENSIONS.items())
    return Reject("unsupported_media", f"{path}: extension not a sample media type ({accepted})")

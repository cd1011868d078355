"""Where every sample of a local `.tar` shard lies, so a stream hands out references and reads a
sample's bytes only when it is made (omni/data/pipeline.py): passing over other ranks' samples, or
a replayed resume's consumed ones, reads no tar data.

A shard's index lists its samples as webdataset groups them (its own `group_by_keys`), each member
as (offset, size) of its bytes, from the tar headers alone (tarfile seeks over the payloads). It is
built once per shard and cached under $XDG_CACHE_HOME/omni/tar-index (written atomically), keyed
by the shard's path and valid while its size and mtime stay the same. A damaged shard keeps the
samples before the damage and its one-line reason, which the stream reports, as a read error, each
time it reads the shard. Shards that are not local uncompressed tars (URLs, `pipe:`, .tar.gz) are
read by webdataset's own reader, with their bytes in the samples (`seekable` tells them apart).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from webdataset.tariterators import group_by_keys

SKIP_META = re.compile(r"__[^/]*__($|/)")  # tar_file_iterator's: webdataset's metadata members


class Member(NamedTuple):
    """Where a sample member's bytes lie in its shard."""
    offset: int
    size: int


class ShardReadError(Exception):
    """A shard is damaged: its samples after the damage cannot be read."""


@dataclass(frozen=True)
class ShardIndex:
    samples: list[dict]  # webdataset's sample dicts, each member a Member instead of its bytes
    errors: list[str]    # why samples are missing (damage), one line each


def seekable(url: str) -> bool:
    """A local uncompressed tar: its members can be read at their offsets."""
    return url.endswith(".tar") and "://" not in url and not url.startswith("pipe:") and os.path.isfile(url)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni" / "tar-index"


def _scan(path: str) -> ShardIndex:
    """The index from the tar headers (no payload is read)."""
    errors: list[str] = []
    size = os.path.getsize(path)

    def files() -> Iterator[dict]:
        try:
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:
                    name = info.name
                    if not info.isreg() or SKIP_META.match(name):
                        continue
                    if info.offset_data + info.size > size:
                        raise tarfile.ReadError(f"member {name} is cut off at byte {size}")
                    yield {"fname": name, "data": Member(info.offset_data, info.size), "__url__": path}
                tar.fileobj.seek(tar.offset)  # tarfile ends quietly at a cut header; a tar ends in zero blocks
                end = tar.fileobj.read(512)
                if end and (len(end) < 512 or any(end)):
                    raise tarfile.ReadError(f"no tar header at byte {tar.offset} (the file is cut off or damaged)")
        except (tarfile.TarError, OSError) as e:
            errors.append(f"{path}: {e}; the samples after it are skipped (rewrite the shard or drop it "
                          "from the manifest)")
        yield {}  # the shard ends: group_by_keys hands out its last sample

    def noted(e: Exception) -> bool:
        errors.append(f"{path}: {e}")
        return True

    return ShardIndex(list(group_by_keys(files(), handler=noted)), errors)


_indexes: dict[tuple[str, int, int], ShardIndex] = {}


def shard_index(path: str) -> ShardIndex:
    """`path`'s index: this process's copy, the cached one if the shard is unchanged, or a new scan."""
    st = os.stat(path)
    stamp = (path, st.st_size, st.st_mtime_ns)
    if stamp in _indexes:
        return _indexes[stamp]
    cache = _cache_dir() / (hashlib.blake2b(stamp[0].encode(), digest_size=16).hexdigest() + ".json")
    index = None
    try:
        saved = json.loads(cache.read_text())
        if (saved["size"], saved["mtime_ns"]) == stamp[1:]:
            samples = [{k: Member(*v) if isinstance(v, list) else v for k, v in s.items()} for s in saved["samples"]]
            index = ShardIndex(samples, saved["errors"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or from another shard state: scan
    if index is None:
        index = _scan(path)
        _save(cache, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "samples": index.samples,
                      "errors": index.errors})
    _indexes[stamp] = index
    return index


def _save(cache: Path, content: dict) -> None:
    """Write atomically (a reader sees the old file or the whole new one); a cache that cannot be
    written only costs a scan in the next process."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, suffix=".tmp", delete=False) as f:
            json.dump(content, f)
        os.replace(f.name, cache)
    except OSError:
        pass


def load(sample: dict) -> dict:
    """The sample with its members' bytes (read at their offsets) in place of their references."""
    refs = [(k, v) for k, v in sample.items() if isinstance(v, Member)]
    if not refs:
        return sample
    out = dict(sample)
    with open(sample["__url__"], "rb") as f:
        for k, member in refs:
            f.seek(member.offset)
            data = f.read(member.size)
            if len(data) != member.size:
                raise ShardReadError(f"{sample['__url__']} changed while training (member {k} of "
                                     f"{sample['__key__']} is cut off); do not rewrite shards during a run")
            out[k] = data
    return out

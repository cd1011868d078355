"""Atomic folder writes: a temporary folder beside the target, renamed into place on success.

A process killed mid-write leaves the previous folder or the new one, never a torn one. Every
folder omni writes (stage output, checkpoint, export, conversion) goes through `atomic_dir`.

The temporary folder is `.NAME.tmp-HOST-PID` (and a replaced folder briefly `.NAME.old-HOST-PID`),
so the next write of the same target recognises what a killed run left behind and removes it:
those of this host whose process is gone. Folders and files get the user's umask, like any `mkdir`
(some writers, safetensors among them, create files 0600).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in chunks (weights files are recorded and checked by it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(folder: Path) -> None:
    """Folders 0777 and files 0666 (executables 0777), less the umask: what a plain write would give."""
    mask = _umask()
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        full = 0o777 if p.is_dir() or p.stat().st_mode & 0o111 else 0o666
        os.chmod(p, full & ~mask)


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(target: str | Path) -> list[Path]:
    """Remove the temporaries a killed write of `target` left beside it (this host's, whose process
    is gone); a replaced folder whose new one never arrived is put back. Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for p in sorted(target.parent.glob(f".{target.name}.{kind}-{host}-*")):
            pid = p.name.rpartition("-")[2]
            if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
                continue
            if kind == "old" and not target.exists():
                os.replace(p, target)  # killed between replace_dir's two renames: the previous folder returns
                log.warning("%s: restored from %s (an interrupted write)", target, p.name)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.warning("%s: removed %d stale temporary folder(s) of killed runs: %s", target, len(removed),
                    ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.with_name(f".{target.name}.tmp-{_tag()}")
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 would stay on the output folder
    try:
        yield tmp
        _honour_umask(tmp)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` in place of `target` (renames only; the old one is removed after)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{_tag()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old)

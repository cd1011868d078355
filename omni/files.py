"""Atomic folder writes: a temporary folder beside the target, renamed into place on success.

A process killed mid-write leaves the previous folder or the new one, never a torn one. Every
folder omni writes (stage output, checkpoint, export, conversion) goes through `atomic_dir`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` in place of `target` (renames only; the old one is removed after)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old)

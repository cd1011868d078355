"""Weights files are checked against the sha256 recorded when omni wrote them: one check for every
reader (`load_model`, a resume's `load_weights`, the reward model's head), naming the file.
OMNI_VERIFY_WEIGHTS=0 skips it (for speed)."""
from __future__ import annotations

import os
from pathlib import Path

from omni.config import ConfigError
from omni.files import file_sha256

CHECKSUMS = "weights_sha256"  # config key {weights file name: sha256}, written beside the weights
VERIFY_ENV = "OMNI_VERIFY_WEIGHTS"
SKIP_HINT = f"(to load it anyway, unchecked: {VERIFY_ENV}=0)"


def verify_by_default() -> bool:
    """Whether loads check hashes and scan for NaN/inf: yes unless OMNI_VERIFY_WEIGHTS=0."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def check_recorded(path: str | Path, checksums: dict | None, verify: bool | None = None) -> None:
    """Refuse weights file `path` unless its sha256 is the one `checksums` ({file name: sha256}, from
    the folder's config) records for it. No record (a folder from before checksums): nothing to
    check. `verify`: default `verify_by_default()`."""
    path = Path(path)
    if not (verify_by_default() if verify is None else verify) or not checksums or path.name not in checksums:
        return
    if file_sha256(path) != checksums[path.name]:
        raise ConfigError(f"{path}: sha256 differs from the one recorded when it was saved: the file is truncated, "
                          f"damaged or was changed since; copy or export it again {SKIP_HINT}")

"""argparse `type=` checks shared by the `omni` commands: a bad value stops the command with one
line naming the option and what it takes (argparse adds the option name), before any work."""
from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, limits, batch sizes: 0 or less has no meaning)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (sizes in GiB, rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number above 0")
    return value


def out_folder(text: str) -> str:
    """An output folder: new, or an existing folder (never an existing file)."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is a file, not a folder; choose a folder path")
    return text


def port_number(text: str) -> int:
    """A TCP port to listen on: 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1 to 65535)")
    return value


def wav_path(text: str) -> str:
    """A WAV file to write: a .wav name whose folder exists and that is not a folder itself."""
    path = Path(text)
    if path.suffix.lower() != ".wav":
        raise argparse.ArgumentTypeError(f"{text} must end in .wav (the spoken answer is written as WAV)")
    if path.is_dir() or not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a file path in an existing folder")
    return text

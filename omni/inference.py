"""What `omni chat` and the demo put in front of the generator (omni/model/generate.py): the
`--device` / `--dtype` options, the user's media files, checked and loaded, and the placeholders a
first turn leaves out. Imports of decoders wait for a file to load: building the `omni` parser
(which adds these options) stays fast.

A file that cannot be used fails here, before any turn, with one SampleError naming the option
and the file and saying what to pass instead.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from omni.errors import SampleError
from omni.modalities import MODALITIES, PLACEHOLDERS

_KINDS = {"image": "an image (PNG, JPEG, WebP, ...)", "video": "a video (MP4, WebM, AVI, ...)",
          "audio": "an audio file (WAV, FLAC, MP3, ...) or a video with a sound track"}


def add_placement_arguments(p: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` of every command that runs a model (chat, eval, demo)."""
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="weights and activations (default: bf16 on cuda, fp32 on cpu; bf16 on cpu works, slowly)")


def _reason(e: BaseException) -> str:
    """The first line of a decoder's complaint, kept short: decord's carry a time stamp, its source
    location and a C++ stack trace ("[12:00:00] src/video_reader.cc:151: Check failed: ... ERROR why")."""
    text = str(e.__cause__ or e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line).rpartition("ERROR ")[2]
    return line if len(line) <= 160 else line[:157] + "..."


def _load_one(modality: str, path: str | Path):
    from PIL import Image

    from encoders import load_audio
    from encoders.video import VideoSamplingConfig, read_video

    where = f"--{modality} {path}"
    if not Path(path).is_file():
        raise SampleError(f"{where}: no such file")
    if Path(path).stat().st_size == 0:
        raise SampleError(f"{where}: the file is empty; pass {_KINDS[modality]}")
    try:
        if modality == "image":
            with Image.open(path) as im:
                return im.convert("RGB")
        if modality == "video":
            read_video(str(path), VideoSamplingConfig(max_frames=1))  # one frame: it opens, has pictures
            return str(Path(path))  # the processor samples its frames (its own fps and cap) per prompt
        return load_audio(str(path))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SampleError(f"{where}: cannot read it as {modality} ({_reason(e)}); pass {_KINDS[modality]}") from None


def load_media(images=(), videos=(), audios=()) -> dict[str, list]:
    """Media files from disk in the form the processor takes (videos stay paths, checked by
    decoding a frame); SampleError naming the first file that cannot be used."""
    media: dict[str, list] = {}
    for modality, paths in (("image", images), ("video", videos), ("audio", audios)):
        for path in paths:
            media.setdefault(modality, []).append(_load_one(modality, path))
    return media


def with_placeholders(text: str, counts: dict[str, int]) -> str:
    """Put the placeholders the user left out in front of `text`, as `omni chat` does:
    image, video, audio in that order, each followed by a space."""
    missing = "".join(f"{PLACEHOLDERS[m]} " * (counts.get(m, 0) - text.count(PLACEHOLDERS[m]))
                      for m in MODALITIES)
    return missing + text

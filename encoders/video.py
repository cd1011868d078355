"""Video frames: sample at a fixed rate with decord, capped, for the shared image tower.

A fixed sampling rate keeps the number of visual tokens proportional to duration (and aligned
with the audio timeline); the cap bounds the cost of long videos.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import decord
import numpy as np
from PIL import Image

_EPS = 1e-6  # absorbs float error so t_k landing exactly on a frame boundary picks that frame

# decord 0.6 seems to infer channels from FFmpeg's padded row size: some narrow widths (8, 16, 24,
# 48, 72 px seen) decode as 4-12 "channels" and get_batch fails (github.com/dmlc/decord/issues/336).
_DECORD_HINT = " (decord mis-decodes some narrow frame widths, e.g. 16/24/48/72 px: dmlc/decord#336)"


@dataclass
class VideoSamplingConfig:
    fps: float = 1.0  # frames sampled per second of video
    max_frames: int = 48  # cap; beyond it, max_frames indices spread uniformly over the video

    def __post_init__(self) -> None:
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"VideoSamplingConfig: fps must be a positive number, got {self.fps!r}")
        if not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"VideoSamplingConfig: max_frames must be an int >= 1, got {self.max_frames!r}")


def sample_frame_indices(num_frames: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frame indices to sample, in increasing order.

    Rule: duration = num_frames / native_fps. Timestamps t_k = k / fps for k = 0, 1, ... while
    t_k < duration; frame index = min(floor(t_k * native_fps), num_frames - 1), i.e. the frame
    on screen at t_k (frame i spans [i / native_fps, (i + 1) / native_fps)). At least one frame
    (index 0). If that gives more than max_frames, return instead
    round(np.linspace(0, num_frames - 1, max_frames)): first and last frame included, evenly
    spread. Indices repeat only when fps > native_fps (the video has fewer distinct frames).
    """
    if num_frames < 1:
        raise ValueError(f"sample_frame_indices: num_frames must be >= 1, got {num_frames}")
    if not native_fps > 0 or not fps > 0 or max_frames < 1:
        raise ValueError(
            "sample_frame_indices: need native_fps > 0, fps > 0, max_frames >= 1; "
            f"got {native_fps}, {fps}, {max_frames}"
        )
    duration = num_frames / native_fps
    count = max(1, math.ceil(duration * fps - _EPS))  # number of k with k / fps < duration
    if count > max_frames:
        return [int(i) for i in np.round(np.linspace(0, num_frames - 1, max_frames))]
    return [min(math.floor(k / fps * native_fps + _EPS), num_frames - 1) for k in range(count)]


def _describe(source: bytes | str | os.PathLike) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else repr(os.fspath(source))


@dataclass
class VideoClip:
    frames: list[Image.Image]  # RGB, in time order
    seconds: float             # duration of the whole source
    spread: bool               # longer than max_frames / fps: max_frames spread evenly, not fps


def read_video(source: bytes | str | os.PathLike, cfg: VideoSamplingConfig) -> VideoClip:
    """Decode the frames chosen by ``sample_frame_indices`` as RGB PIL images, with the source's
    duration and whether the cap spread them (so a caller can say so).

    ``source`` is a path or the file's bytes (decord reads file-likes from memory).
    Raises ValueError naming the source if it cannot be opened or has no frames.
    """
    name = _describe(source)
    try:
        uri = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        reader = decord.VideoReader(uri, ctx=decord.cpu(0), num_threads=1)  # parallelism comes from loader workers
        num_frames, native_fps = len(reader), float(reader.get_avg_fps())
        indices = sample_frame_indices(num_frames, native_fps, cfg.fps, cfg.max_frames)
        batch = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError, AssertionError, ValueError, OSError) as e:
        hint = _DECORD_HINT if "DECORDArrayCopyFromTo" in str(e) else ""
        raise ValueError(f"read_video: cannot read video {name}: {e}{hint}") from e
    if batch.ndim != 4 or batch.shape[-1] != 3:
        shape = tuple(batch.shape)
        raise ValueError(f"read_video: decord returned frames of shape {shape} for {name}" + _DECORD_HINT)
    seconds = num_frames / native_fps if native_fps > 0 else 0.0
    spread = math.ceil(seconds * cfg.fps - _EPS) > cfg.max_frames
    return VideoClip([Image.fromarray(frame) for frame in batch], seconds, spread)

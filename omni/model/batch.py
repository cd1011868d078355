"""The preprocessed media of a batch, in placeholder order, as the model consumes it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MediaBatch:
    image: torch.Tensor | None = None           # [total_tiles, 3, S, S]; each image's tiles consecutive
    image_tiles: list[int] = field(default_factory=list)    # tiles per image (AnyRes), in order
    video: torch.Tensor | None = None           # [total_frames, 3, S, S]; each video's frames consecutive
    video_frames: list[int] = field(default_factory=list)   # frames per video, in order
    audio: torch.Tensor | None = None           # [n_windows, n_mels, 2*n_ctx] whisper log-mel windows
    audio_valid: list[int] = field(default_factory=list)    # encoder frames with real audio, per window

    def to(self, device) -> "MediaBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MediaBatch(move(self.image), list(self.image_tiles), move(self.video), list(self.video_frames),
                          move(self.audio), list(self.audio_valid))

    @staticmethod
    def concat(items: list["MediaBatch"]) -> "MediaBatch":
        """Join per-sample media in sample order (matches row-major placeholder order)."""
        def cat(name):
            ts = [getattr(m, name) for m in items if getattr(m, name) is not None]
            return torch.cat(ts) if ts else None
        return MediaBatch(
            image=cat("image"),
            image_tiles=[t for m in items for t in m.image_tiles],
            video=cat("video"),
            video_frames=[f for m in items for f in m.video_frames],
            audio=cat("audio"),
            audio_valid=[v for m in items for v in m.audio_valid],
        )

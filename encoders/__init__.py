"""Modality encoders: open_clip image tower, decord video sampling, whisper audio tower.

Leaf package: never imports ``omni``; ``omni`` composes these.
"""

from encoders.audio import HOP, SAMPLE_RATE, AudioEncoder, AudioTowerConfig, load_audio
from encoders.image import ImageEncoder, ImageTowerConfig
from encoders.video import VideoSamplingConfig, read_video_frames, sample_frame_indices

__all__ = [
    "HOP",
    "SAMPLE_RATE",
    "AudioEncoder",
    "AudioTowerConfig",
    "ImageEncoder",
    "ImageTowerConfig",
    "VideoSamplingConfig",
    "load_audio",
    "read_video_frames",
    "sample_frame_indices",
]

"""Modality encoders: open_clip image tower, decord video sampling, whisper audio tower.

Leaf package: never imports ``omni``; ``omni`` composes these.
"""

from encoders.anyres import AnyResConfig, anyres_tiles, candidate_grids, num_tiles, select_grid
from encoders.audio import HOP, SAMPLE_RATE, AudioEncoder, AudioTowerConfig, dbfs, load_audio, loudest_frame_dbfs
from encoders.image import ImageEncoder, ImageTowerConfig
from encoders.video import VideoClip, VideoSamplingConfig, read_video, sample_frame_indices

__all__ = [
    "HOP",
    "SAMPLE_RATE",
    "AnyResConfig",
    "AudioEncoder",
    "AudioTowerConfig",
    "ImageEncoder",
    "ImageTowerConfig",
    "VideoClip",
    "VideoSamplingConfig",
    "anyres_tiles",
    "candidate_grids",
    "dbfs",
    "load_audio",
    "loudest_frame_dbfs",
    "num_tiles",
    "read_video",
    "sample_frame_indices",
    "select_grid",
]

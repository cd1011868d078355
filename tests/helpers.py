"""Small media writers shared by tests (real files, written with the real libraries)."""
from __future__ import annotations

import av
import numpy as np


def write_mp4(path, num_frames: int, rate, width: int = 32, height: int = 32) -> None:
    """mpeg4/yuv420p clip whose frames get brighter one by one (keep width >= 32: dmlc/decord#336)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            level = 16 + (219 * i) // max(1, num_frames - 1)
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

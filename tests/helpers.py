"""Small media writers shared by tests (real files, written with the real libraries), and the
`omni` command's own exit line, and the bench scripts as modules."""
from __future__ import annotations

import importlib.util
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image


# a random-init Mimi codec of the real class, small enough for unit tests (4 codebooks of 64)
TINY_MIMI = dict(hidden_size=32, num_filters=4, upsampling_ratios=[8, 5, 4, 2], codebook_size=64, codebook_dim=16,
                 num_quantizers=4, vector_quantization_hidden_dimension=16, upsample_groups=32, num_hidden_layers=1,
                 intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, sliding_window=16)


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


def image_and_tone(folder):
    """A random 32-px PNG and a 0.75 s 440 Hz mono 16 kHz WAV in `folder`; returns their paths."""
    img = folder / "shape.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    wav = folder / "tone.wav"
    t = np.arange(12000) / 16000
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    return img, wav


def cli_error(*argv: str) -> str:
    """The one line `omni ARGV` exits with: its own main, in this process (the model stack is
    imported once for all tests, where a subprocess would import it again each time)."""
    from omni.cli.main import main

    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    return str(stop.value.code)


def load_bench(name: str):
    """bench/NAME.py as a module (the bench folder is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

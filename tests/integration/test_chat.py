"""`omni chat` streams the same greedy answer the Python API gives for the same files."""
from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np
import pytest
from PIL import Image

from omni.inference import load_media, stream_answer
from omni.processor import OmniProcessor


@pytest.fixture(scope="module")
def saved_model(tiny_corpus, tmp_path_factory):
    """A briefly trained tiny model, so that greedy answers are words, not special tokens."""
    from pathlib import Path

    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    root = Path(__file__).resolve().parents[2]
    cfg = load_stage(root / "stages/tiny/2_sft.yaml", [f"data.manifest={tiny_corpus}", "init_from=null",
                                                      "steps=8", "batch.micro_batch=8", "optim.lr=3e-3"])
    return train_stage(cfg, tmp_path_factory.mktemp("chat"), progress=False)


def _files(tmp_path):
    img = tmp_path / "shape.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    wav = tmp_path / "tone.wav"
    t = np.arange(12000) / 16000
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    return img, wav


def test_chat_cli_streams_the_api_answer(saved_model, tmp_path):
    from omni.model import OmniModel

    img, wav = _files(tmp_path)
    prompt = "which note is played?"
    out = subprocess.run([sys.executable, "-m", "omni.cli", "chat", str(saved_model), "--image", str(img),
                          "--audio", str(wav), "--prompt", prompt, "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    model, tok = OmniModel.from_pretrained(saved_model)
    model.eval()
    media = load_media(images=[img], audios=[wav])
    msgs = [{"role": "user", "content": f"<image> <audio> {prompt}"}]
    expected = "".join(stream_answer(model, tok, OmniProcessor(tok, model), msgs, media, max_new_tokens=6))
    assert expected.strip() and out.stdout.strip() == expected.strip()


def test_chat_is_multi_turn_on_stdin(saved_model, tmp_path):
    img, _ = _files(tmp_path)
    out = subprocess.run([sys.executable, "-m", "omni.cli", "chat", str(saved_model), "--image", str(img),
                          "--max-new-tokens", "3"], input="what colour is the shape?\nand the shape?\n/quit\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("omni> ") == 2

"""`omni chat` streams the same greedy answer the Python API gives for the same files."""
from __future__ import annotations

import subprocess
import sys

from omni.inference import load_media
from omni.model.generate import LocalGenerator
from tests.helpers import image_and_tone


def test_chat_cli_streams_the_api_answer(trained_tiny, tmp_path):
    img, wav = image_and_tone(tmp_path)
    prompt = "which note is played?"
    out = subprocess.run([sys.executable, "-m", "omni.cli", "chat", str(trained_tiny), "--image", str(img),
                          "--audio", str(wav), "--prompt", prompt, "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    gen = LocalGenerator.load(trained_tiny, device="cpu")
    msgs = [{"role": "user", "content": f"<image> <audio> {prompt}"}]
    expected = "".join(gen.stream(gen.prompt(msgs, load_media(images=[img], audios=[wav])), max_new_tokens=6))
    assert expected.strip() and out.stdout.strip() == expected.strip()


def test_chat_is_multi_turn_on_stdin(trained_tiny, tmp_path):
    img, _ = image_and_tone(tmp_path)
    out = subprocess.run([sys.executable, "-m", "omni.cli", "chat", str(trained_tiny), "--image", str(img),
                          "--max-new-tokens", "3"], input="what colour is the shape?\nand the shape?\n/quit\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("omni> ") == 2

"""`omni chat` answers every bad input with one line naming the file or the turn and what to do,
never a traceback; an interactive session survives a bad turn and keeps its history."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from omni.cli.main import main
from omni.inference import load_media
from omni.model.generate import LocalGenerator
from tests.helpers import image_and_tone, write_mp4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-media")
    img, wav = image_and_tone(folder)
    write_mp4(folder / "clip.mp4", num_frames=8, rate=4)  # a real video, no sound track
    (folder / "garbage.png").write_bytes(bytes(range(256)) * 8)
    (folder / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(200)) * 4)
    (folder / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 20)
    (folder / "empty.png").write_bytes(b"")
    return {"img": img, "wav": wav, "mp4": folder / "clip.mp4", "dir": folder}


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    out = tmp_path_factory.mktemp("chat-model") / "model"
    model.save_pretrained(out, tok)
    return out


def _exit_line(argv) -> str:
    """The message `omni ...` exits with (what the shell shows), asserted to be one line."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    message = done.value.code
    assert isinstance(message, str) and "\n" not in message.strip(), message
    return message


@pytest.mark.parametrize("option,name,words", [
    ("--image", "garbage.png", "cannot read it as image"),
    ("--image", "empty.png", "the file is empty"),
    ("--image", "missing.png", "no such file"),
    ("--video", "garbage.mp4", "cannot read it as video"),
    ("--video", "tone.wav", "cannot read it as video"),          # audio passed as a video
    ("--audio", "clip.mp4", "no audio stream"),                  # a silent video passed as audio
    ("--audio", "garbage.wav", "cannot read it as audio"),
])
def test_a_bad_media_file_is_one_line_naming_it(files, option, name, words):
    path = files["dir"] / name
    line = _exit_line(["chat", "no-model-needed", option, str(path), "--prompt", "hi"])
    assert line.startswith(f"{option} {path}:") and words in line
    assert words == "no such file" or "; pass " in line  # what to give instead


def test_good_media_load(files):
    media = load_media(images=[files["img"]], videos=[files["mp4"]], audios=[files["wav"]])
    assert media["image"][0].size == (32, 32) and media["video"] == [str(files["mp4"])]
    assert media["audio"][0].shape == (12000,)


@pytest.mark.parametrize("extra,words", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: the answer needs at least 1 new token"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "<image> <image> compare them"], "--prompt: image: 2 '<image>' placeholder(s) in the text but 1"),
    (["--prompt", "word " * 1100], "--prompt: sequence of"),
    (["--prompt", "word " * 1000, "--max-new-tokens", "64"], "exceed the model's context of 1024 tokens; shorten"),
])
def test_a_bad_prompt_is_one_line_saying_what_to_do(files, model_dir, extra, words):
    argv = ["chat", str(model_dir), "--image", str(files["img"]), *extra]
    if "--prompt" not in extra:
        argv += ["--prompt", "hi"]
    assert words in _exit_line(argv)


def test_no_traceback_in_a_real_process(files):
    out = subprocess.run([sys.executable, "-m", "omni.cli", "chat", "no-model-needed", "--audio", str(files["mp4"]),
                          "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and str(files["mp4"]) in out.stderr


def test_interactive_session_survives_bad_turns_and_keeps_its_history(trained_tiny, files):
    first, last = "what colour is the shape?", "and the shape?"
    turns = [first, "<image> <image> compare", "word " * 1100, last, "/quit"]
    out = subprocess.run([sys.executable, "-m", "omni.cli", "chat", str(trained_tiny), "--image", str(files["img"]),
                          "--max-new-tokens", "4"], input="\n".join(turns) + "\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("turn ")]
    assert len(errors) == 2 and errors[0].startswith("turn 2: image: 3 '<image>'")
    assert errors[1].startswith("turn 3: sequence of") and "/reset" in errors[1]
    answers = re.findall(r"omni> (.*)", out.stdout)
    assert len(answers) == 2

    gen = LocalGenerator.load(trained_tiny, device="cpu")  # the last answer saw the first turn, not the bad ones
    media = load_media(images=[files["img"]])
    history = [{"role": "user", "content": f"<image> {first}"}, {"role": "assistant", "content": answers[0].strip()},
               {"role": "user", "content": last}]
    expected = "".join(gen.stream(gen.prompt(history, media), 4)).strip()
    assert expected and answers[1].strip() == expected

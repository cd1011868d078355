"""The demo in a real browser: Debian's Chromium, headless, driven by Playwright.

One server (`omni demo` as `python -m omni.cli demo`, a tiny model trained a few steps) on a free loopback port;
1. uploads an image and an audio file, asks a question, and the streamed answer equals
   the generator's (`LocalGenerator.stream`) for the same inputs (what `omni chat` prints, tests/integration/test_chat.py);
   a non-media upload gets a message and the next question is still answered; two tabs asking at
   once are both answered (queued, one generation at a time);
2. a fake camera and microphone (Chromium reads them from a .y4m and a .wav): the webcam streams
   frames into the window, the VAD ends the utterance after the tone, and an answer arrives
   with the frames encoded ahead;
3. a second server with `--pas` (a loopback endpoint plays the PAS model): a typed turn reaches
   the model with its complement (the answer equals the generator's for question + complement),
   the complement is shown under the turn, and unticking the switch sends the next turn as typed;
4. a server whose model has a talker (fitted briefly to say one word, bench/inference.py
   `give_voice`): the text answer streams, then the spoken answer arrives in the page's audio
   player in chunks and plays.
Screenshots land in the tests' tmp dirs.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SPEAKING_QUESTION
from tests.helpers import image_and_tone

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the integrator's `make test` installs it
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 6
pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright (the Python package) is not installed; "
                                                       "`pip install playwright` (no browser download needed)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing; `apt-get install -y chromium`"),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model, tmp: Path, extra: list[str] = ()):
    """`python -m omni.cli demo` on a free loopback port; yields its URL, stops it afterwards."""
    port = _free_port()
    log = open(tmp / "server.log", "w+")  # noqa: SIM115 - open while the server runs
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # cwd is tmp
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, "-m", "omni.cli", "demo", "--model", str(model),
                             "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"demo server did not start on {url}:\n{log.read()[-4000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.seek(0)
    print(log.read()[-3000:])  # shown with -s or on failure: per-turn TTFT / tokens/s lines
    log.close()


@pytest.fixture(scope="module")
def server(trained_tiny, tmp_path_factory):
    yield from _serve(trained_tiny, tmp_path_factory.mktemp("demo-server"))


def _browser(p, tmp_path, extra=()):
    context = p.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
        args=CHROMIUM_ARGS + list(extra), viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    return context


def _open(context, url):
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#omni-input textarea")
    return page


def _wait_turn(page, n: int, timeout_ms: int = 30_000) -> str:
    """Wait until turn n is done (the metrics line no longer says generating); returns the line."""
    page.wait_for_function(
        "n => { const t = document.querySelector('#omni-metrics').innerText;"
        " return t.includes(`turn ${n} ·`) && !t.includes('generating'); }", arg=n, timeout=timeout_ms)
    return page.inner_text("#omni-metrics")


def _bot_messages(page) -> list[str]:
    return [t.strip() for t in page.locator('#omni-chat [data-testid="bot"]').all_inner_texts()]


def _ask(page, text: str, files=(), send: bool = True):
    if files:
        page.set_input_files("#omni-input input[type=file]", [str(f) for f in files])
        page.wait_for_function("k => document.querySelectorAll('#omni-input .thumbnail-item').length >= k",
                               arg=len(files), timeout=15_000)
    page.fill("#omni-input textarea", text)
    if send:
        page.press("#omni-input textarea", "Enter")


def test_uploaded_image_and_audio_get_the_generators_answer(server, trained_tiny, tmp_path):
    from omni.inference import load_media
    from omni.model.generate import LocalGenerator

    img, wav = image_and_tone(tmp_path)
    question = "which note is played?"
    gen = LocalGenerator.load(trained_tiny, device="cpu")
    msgs = [{"role": "user", "content": f"<image> <audio> {question}"}]
    expected = "".join(gen.stream(gen.prompt(msgs, load_media(images=[img], audios=[wav])), MAX_NEW_TOKENS)).strip()
    assert expected

    junk = tmp_path / "notes.txt"
    junk.write_text("not a medium")
    with sync_playwright() as p:
        context = _browser(p, tmp_path)
        page = _open(context, server)
        _ask(page, question, [img, wav])
        metrics = _wait_turn(page, 1)
        assert _bot_messages(page) == [expected]
        assert "TTFT" in metrics and "tokens" in metrics
        user = page.locator('#omni-chat [data-testid="user"]')
        assert user.locator("img").count() >= 1 and user.locator("[data-testid^=waveform]").count() >= 1
        page.screenshot(path=str(tmp_path / "demo-upload.png"), full_page=True)

        # a non-media file: a message, nothing sent; the server keeps answering
        _ask(page, "what is this?", [junk])
        page.wait_for_function("() => document.querySelector('#omni-chat').innerText"
                               ".includes('is not an image, video or audio file')")
        assert "input refused" in page.inner_text("#omni-metrics")

        # two tabs at once: queued, both answered, each in its own session (its 2nd / 1st turn)
        other = _open(context, server)
        _ask(page, question, [img, wav], send=False)
        _ask(other, question, [img, wav], send=False)
        page.press("#omni-input textarea", "Enter")
        other.press("#omni-input textarea", "Enter")
        _wait_turn(page, 2)
        _wait_turn(other, 1)
        assert _bot_messages(other) == [expected]
        assert len(_bot_messages(page)) == 3 and _bot_messages(page)[-1]  # answer, refusal, answer
        context.close()
    assert (tmp_path / "demo-upload.png").stat().st_size > 10_000


def _y4m(path, frames: int = 10, fps: int = 10, w: int = 64, h: int = 48):
    """A blue disc on grey as YUV 4:2:0 (Chromium's fake camera file format)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.full((h, w, 3), 90.0)
    rgb[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= (h // 3) ** 2] = (40, 70, 235)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.257 * r + 0.504 * g + 0.098 * b + 16
    u = (-0.148 * r - 0.291 * g + 0.439 * b + 128).reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    v = (0.439 * r - 0.368 * g - 0.071 * b + 128).reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    planes = b"".join(np.clip(p, 0, 255).astype(np.uint8).tobytes() for p in (y, u, v))
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        f.writelines(b"FRAME\n" + planes for _ in range(frames))


def test_fake_camera_and_microphone_get_a_streamed_answer(server, tmp_path):
    cam, mic = tmp_path / "camera.y4m", tmp_path / "mic.wav"
    _y4m(cam)
    sr = 48_000  # Chromium loops the file: 1 s quiet, 0.8 s tone, 1.2 s quiet, ...
    t = np.arange(int(0.8 * sr)) / sr
    signal = np.concatenate([np.zeros(sr), 0.5 * np.sin(2 * np.pi * 440 * t), np.zeros(int(1.2 * sr))])
    with wave.open(str(mic), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((signal * 32767).astype("<i2").tobytes())
    fake = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={cam}", f"--use-file-for-fake-audio-capture={mic}"]
    with sync_playwright() as p:
        context = _browser(p, tmp_path, fake)
        page = _open(context, server)
        page.fill("#omni-input textarea", "what colour is the shape?")  # typed text rides with the voice turn
        page.click("#omni-camera >> text=Click to Access Webcam")
        page.click("#omni-camera button.capture-button")
        page.wait_for_function("() => document.querySelector('#omni-camera-status').innerText.includes('2/')")
        page.click("#omni-mic >> text=Record")
        metrics = _wait_turn(page, 1, timeout_ms=20_000)
        answers = _bot_messages(page)
        assert answers and answers[0] and not answers[0].startswith(("⚠", "*(")), answers
        assert " 0 tokens" not in metrics and "TTFT nan" not in metrics, metrics
        frames, total = (int(x) for x in metrics.split(" frames encoded ahead")[0].split(" · ")[-1].split("/"))
        assert total >= 2 and frames == total, metrics  # every camera frame was encoded before the turn
        assert "end of speech → first token" in metrics
        user = page.locator('#omni-chat [data-testid="user"]')
        # the frames the model saw, as a contact sheet (Gradio may render it after the metrics line)
        user.locator("img").first.wait_for(timeout=20_000)
        assert "camera: the last" in page.inner_text("#omni-chat")
        page.screenshot(path=str(tmp_path / "demo-live.png"), full_page=True)
        context.close()
    assert (tmp_path / "demo-live.png").stat().st_size > 10_000


COMPLEMENT = "answer with one colour word."


@pytest.fixture(scope="module")
def pas_server(trained_tiny, tmp_path_factory):
    """The demo with `--pas` pointing at a loopback OpenAI-compatible endpoint playing the PAS model
    (the real client talks to it); yields (URL, the endpoint with the requests it received)."""
    from tests.unit.test_align_judge import StubChat

    pas = StubChat(lambda messages: COMPLEMENT)
    try:
        for url in _serve(trained_tiny, tmp_path_factory.mktemp("pas-server"), ["--pas", pas.url]):
            yield url, pas
    finally:
        pas.close()


def test_the_pas_switch_adds_the_complement_before_the_model_reads_the_turn(pas_server, trained_tiny, tmp_path):
    from omni.inference import load_media, with_placeholders
    from omni.model.generate import LocalGenerator

    url, pas = pas_server
    img, _ = image_and_tone(tmp_path)
    question = "what colour is the shape?"
    gen = LocalGenerator.load(trained_tiny, device="cpu")
    augmented = [{"role": "user", "content": with_placeholders(f"{question}\n{COMPLEMENT}", {"image": 1})}]
    expected = "".join(gen.stream(gen.prompt(augmented, load_media(images=[img])), MAX_NEW_TOKENS)).strip()
    with sync_playwright() as p:
        context = _browser(p, tmp_path)
        page = _open(context, url)
        assert page.is_checked("#omni-pas input[type=checkbox]")  # on when the demo has --pas
        _ask(page, question, [img])
        _wait_turn(page, 1)
        assert _bot_messages(page) == [expected]  # the model read the question + the complement
        users = page.locator('#omni-chat [data-testid="user"]')
        assert f"PAS: {COMPLEMENT}" in users.last.inner_text()
        page.screenshot(path=str(tmp_path / "demo-pas.png"), full_page=True)

        page.uncheck("#omni-pas input[type=checkbox]")  # switched off: the turn goes as typed
        _ask(page, "and now?")
        _wait_turn(page, 2)
        assert "PAS:" not in users.last.inner_text()
        context.close()
    assert [r["messages"] for r in pas.requests] == [[{"role": "user", "content": question}]]


@pytest.fixture(scope="module")
def speaking_server(speaking_tiny, tmp_path_factory):
    """The demo serving `speaking_tiny` (a talker fitted to say one word); yields (URL, its text answer)."""
    folder, _, answer = speaking_tiny
    for url in _serve(folder, tmp_path_factory.mktemp("speaking-server")):
        yield url, answer


def test_the_spoken_answer_streams_into_the_page_and_plays(speaking_server, tmp_path):
    assert shutil.which("ffmpeg"), "ffmpeg is missing (gradio encodes streamed audio with it): run `make browser`"
    url, answer = speaking_server
    img, _ = image_and_tone(tmp_path)  # the picture the talker was fitted on (the same pixels)
    with sync_playwright() as p:
        context = _browser(p, tmp_path, ["--autoplay-policy=no-user-gesture-required"])
        page = _open(context, url)
        assert page.is_checked("#omni-speak input[type=checkbox]")  # on by default for a model with a talker
        _ask(page, SPEAKING_QUESTION, [img])
        page.wait_for_function("() => document.querySelector('#omni-metrics').innerText.includes('first audio')",
                               timeout=60_000)
        assert _bot_messages(page) == [answer]  # the text answer, as without speech
        # the player got the stream and plays it: its played time ranges grow, its duration is known
        page.wait_for_function(
            "() => { const a = document.querySelector('#omni-speech audio');"
            " return a && a.played.length > 0 && a.played.end(a.played.length - 1) > 0.1; }", timeout=30_000)
        duration = page.evaluate("() => document.querySelector('#omni-speech audio').duration")
        assert duration > 0.1, duration
        page.screenshot(path=str(tmp_path / "demo-speech.png"), full_page=True)
        context.close()
    assert (tmp_path / "demo-speech.png").stat().st_size > 10_000

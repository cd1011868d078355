"""Demo memory under load: 32 browser sessions, each uploading a 12-MP photo and streaming 1080p
webcam frames, driven through the demo's own callbacks (the functions Gradio calls; no browser).

Before, a session kept every upload decoded at full resolution and every webcam frame at camera
size, for an hour after its tab closed (Gradio's state TTL): ~50 MB per such session, so the 24
sessions after warm-up would grow the process by about 1 GB. Now uploads stay files, frames are shrunk to the tower's size, and
a session is freed when its tab closes or when it has been idle too long, so the resident memory after
warm-up stays flat."""
from __future__ import annotations

import gc
import os
import time

import gradio as gr
import numpy as np
import pytest
from PIL import Image
SESSIONS, WARM_UP = 32, 8
PHOTO = (4000, 3000)            # 12 MP: 36 MB decoded
WEBCAM = (1920, 1080)           # 6 MB a frame at camera size
GROWTH_BOUND = 48 * 2**20       # < 1.5 decoded photos; a photo kept per session would add 24 x 36 MB


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fn(demo, name: str):
    [fn] = [d.fn for d in demo.fns.values() if getattr(d.fn, "__name__", "") == name]
    return fn


def _with_request(fn, request):
    """Call `fn` as Gradio's queue does: the request goes to the parameter it finds by type hint."""
    from gradio.helpers import special_args

    args, *_ = special_args(fn, inputs=[], request=request)
    return fn(*args)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 12-MP JPEG with detail (a gradient under noise), as a phone would upload."""
    w, h = PHOTO
    ramp = np.arange(h, dtype=np.uint16)[:, None] * 180 // h + np.arange(w, dtype=np.uint16)[None, :] * 60 // w
    ramp += np.random.default_rng(0).integers(0, 16, (h, w), dtype=np.uint16)
    pixels = np.stack([np.minimum(ramp + off, 255).astype(np.uint8) for off in (0, 30, 60)], axis=-1)
    path = tmp_path_factory.mktemp("uploads") / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return str(path)


def test_many_sessions_with_12mp_uploads_and_webcam_frames_keep_memory_flat(tiny_model, tmp_path, photo):
    from omni.demo.app import build_app
    from omni.demo.engine import DemoEngine

    model, tok = tiny_model
    model.save_pretrained(tmp_path / "model", tok)
    engine = DemoEngine(tmp_path / "model", max_new_tokens=2)
    demo = build_app(engine=engine, idle_min=30.0, max_sessions=16)
    sessions = demo.omni_sessions
    new_session, end_session, respond = _fn(demo, "new_session"), _fn(demo, "end_session"), _fn(demo, "respond")
    webcam = Image.fromarray(np.random.default_rng(1).integers(0, 255, (WEBCAM[1], WEBCAM[0], 3), dtype=np.uint8))

    rss, abandoned, shown = {}, [], []
    held = []  # Gradio's state holder keeps every tab's session object for an hour after it closes
    for i in range(1, SESSIONS + 1):
        request = gr.Request(session_hash=f"tab{i}")
        session = _with_request(new_session, request)
        held.append(session)
        now = time.monotonic()
        for k in range(4):  # the camera's last 4 s, one frame a second
            session.offer_frame(webcam.copy(), now - 3 + k, engine.encode_ahead)
        *_, (_, _, status, _) = respond(session, {"text": "what colour is the shape?", "files": [photo]}, 2, True, False,
                                        False)
        shown.append(status)
        assert session.chat.nbytes() < 2**20  # the photo is a file; 4 camera frames at 32 px
        if i % 4:
            _with_request(end_session, request)  # the tab was closed
        else:
            abandoned.append(session)         # left open: freed by the idle timeout or the session cap
        if i == WARM_UP or i == SESSIONS:
            rss[i] = _rss()
    assert all(s.startswith("turn 1 · TTFT") for s in shown), shown[:3]
    assert len(sessions) == len(abandoned) == SESSIONS // 4 and all(not s.closed for s in abandoned[-10:])
    assert sessions.sweep(time.monotonic() + 31 * 60) == SESSIONS // 4  # 30 min idle: freed
    assert len(sessions) == 0 and all(s.closed and not s.dir.exists() and not s.chat.turns for s in held)
    assert not any(demo.omni_tmp.iterdir())  # every session's recordings and strips are gone
    growth = rss[SESSIONS] - rss[WARM_UP]
    print(f"RSS after {WARM_UP} sessions {rss[WARM_UP] / 2**20:.0f} MB, after {SESSIONS} "
          f"{rss[SESSIONS] / 2**20:.0f} MB (growth {growth / 2**20:+.1f} MB)")
    assert growth < GROWTH_BOUND


def test_a_closed_or_idle_session_is_told_to_reload_and_holds_nothing(tiny_model, tmp_path, photo):
    from omni.demo.sessions import SessionClosed, Sessions
    from omni.model.processor import OmniProcessor

    model, tok = tiny_model
    policy = OmniProcessor.from_config(model.config, tok, model.token_ids).policy
    sessions = Sessions(tmp_path, policy, frame_side=32, idle_s=60, max_sessions=2)
    a, b = sessions.open("a", now=0.0), sessions.open("b", now=10.0)
    items, errors = a.items([photo], [], "", None)
    assert errors == [] and a.add_turn("what colour?", items)[1] == 0
    sessions.touch(a, now=20.0)
    c = sessions.open("c", now=30.0)            # a third tab: the longest idle (b) is freed
    assert b.closed.startswith("more than 2 sessions") and not b.dir.exists()
    with pytest.raises(SessionClosed, match="reload the page"):
        sessions.touch(b, now=31.0)
    assert sessions.sweep(now=85.0) == 1 and a.closed.startswith("idle for more than 1 minutes")
    assert not a.chat.turns and not a.dir.exists() and not c.closed
    d = sessions.open("c", now=86.0)            # the tab reloaded: its old session goes
    assert c.closed == "the page was reloaded" and len(sessions) == 1 and not d.closed


def test_a_session_drops_its_oldest_turns_past_its_memory_budget(tiny_model, tmp_path):
    from omni.demo.session import MediaItem
    from omni.demo.sessions import Session
    from omni.model.processor import OmniProcessor

    model, tok = tiny_model
    policy = OmniProcessor.from_config(model.config, tok, model.token_ids).policy
    session = Session(tmp_path, policy, frame_side=32, max_bytes=3 * 64_000)  # three 1-s clips
    tone = (0.5 * np.sin(np.arange(16_000) * 0.2)).astype(np.float32)
    dropped = [session.add_turn("which note?", [MediaItem("audio", tone, "")])[1] for _ in range(5)]
    assert dropped == [0, 0, 0, 1, 1] and len(session.chat) == 3 and session.chat.nbytes() == 3 * 64_000

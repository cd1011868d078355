"""The demo's browser sessions and what bounds their memory (no UI in here; unit- and soak-tested).

A `Session` is one tab: its chat, webcam window, microphone listener and files. What it keeps
is bounded (docs/demo.md, "Memory"): uploads stay files, camera frames are shrunk to the image
tower's size, and its media in memory never pass `max_bytes` (the oldest turns are dropped, and
the chat says so). `Sessions` holds every open session and frees one when its tab closes
(Gradio's unload event), when it has been idle for `idle_s`, or when more than `max_sessions` are
open (the longest idle goes first), instead of Gradio's default of keeping a closed tab's state for
an hour.
"""
from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

from encoders.audio import SAMPLE_RATE
from omni.demo.session import (
    Conversation,
    FrameWindow,
    Listener,
    MediaError,
    MediaItem,
    contact_sheet,
    load_upload,
    model_audio,
    shrink,
    wav_bytes,
)
from omni.model.media_policy import MediaPolicy
from omni.model.prompt_cache import PromptCache

MAX_SESSION_BYTES = 256 * 2**20  # media one session may hold in memory (a 7B camera turn is ~30 MB)


AHEAD_MARGIN = SAMPLE_RATE // 10  # 16 kHz samples at the end of a recording not prefilled ahead


class SessionClosed(RuntimeError):
    """The session was freed (tab closed, idle too long); the message is for the user."""


class Session:
    """One browser tab. `policy` is the model's media policy, `frame_side` the image tower's size."""

    def __init__(self, root: Path, policy: MediaPolicy, frame_side: int, max_bytes: int = MAX_SESSION_BYTES):
        self.id = uuid.uuid4().hex[:8]
        self.dir = root / self.id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy, self.frame_side, self.max_bytes = policy, frame_side, max_bytes
        self.window = FrameWindow(policy.video.fps, policy.video.max_frames)
        self.listener = Listener("vad")
        self.chat = Conversation()
        self.prompt_cache = PromptCache()          # the LLM's KV cache of this chat's prompt
        self.ahead_of: tuple = ()                  # (frames kept, whole audio windows) last prefilled ahead
        self.shown: list[dict] = []                # chatbot messages
        self.pending: list[tuple[object, float]] = []  # (utterance, perf_counter when it ended)
        self.utterances = 0                        # utterances sent during the current recording
        self.turns = 0
        self.triggers = 0
        self.lock = threading.Lock()
        self.ahead_s = 0.0                         # time of the last frame's encode_ahead
        self.closed = ""                           # why the session was freed; "" while open
        self.last_used = 0.0                       # Sessions' clock at the last event

    def file(self, suffix: str) -> Path:
        return self.dir / f"{uuid.uuid4().hex[:10]}{suffix}"

    def check_open(self) -> None:
        if self.closed:
            raise SessionClosed(f"this session was closed ({self.closed}) and its chat freed: reload the page")

    def offer_frame(self, frame, now: float, encode_ahead) -> bool:
        """A webcam frame: shrunk to the tower's size, and when the window takes it (1/fps after the
        last one) run through `encode_ahead` first, so a turn sent meanwhile sees only encoded frames."""
        if not self.window.due(now):
            return False
        frame = shrink(frame, self.frame_side)
        self.ahead_s = encode_ahead(frame)
        return self.window.offer(frame, now)

    def prefill_ahead(self, use_camera: bool, now: float, prefill) -> float:
        """While an utterance is open: when the camera window took a frame or the recording filled
        another whole audio window since the last call, hand the turn so far (the camera window
        when `use_camera`, the recording as the model will hear it) to `prefill`
        (DemoEngine.prefill_ahead, with this session's prompt cache); returns its seconds. The
        recording's last 0.1 s are left out (the resampler's last samples change as audio
        follows), except during the VAD's pause, when the utterance the pause would end is known
        whole and goes in with its last, partial window."""
        got = self.listener.recording()
        if got is None or not got[0].size:
            return 0.0
        recording, final = got
        frames = self.window.snapshot(now) if use_camera else []
        n = int(recording.size * SAMPLE_RATE / self.listener.sr) - (0 if final else AHEAD_MARGIN)  # at 16 kHz
        key = (self.window.kept if frames else -1, n if final else max(0, n) // self.policy.window_samples, final)
        if key == self.ahead_of:
            return 0.0
        self.ahead_of = key
        wav = None
        if final or key[1]:
            try:
                wav, _ = model_audio(recording, self.listener.sr, self.policy)
                wav = wav if final else wav[: max(0, wav.size - AHEAD_MARGIN)]
            except MediaError:  # only silence so far
                wav = None
        if not frames and wav is None:
            return 0.0
        return prefill(self.prompt_cache, self.chat, frames, wav, partial=final)

    def items(self, files: list[str], camera: list, camera_note: str, utterance) -> tuple[list[MediaItem], list[str]]:
        """A turn's media: uploaded `files`, the `camera` frames (with `camera_note`), the microphone
        `utterance`; and the refusals, one line each. Videos and cut audio get a file to show."""
        items, errors = [], []
        for path in files:
            try:
                item = load_upload(path, self.policy)
            except MediaError as e:
                errors.append(str(e))
                continue
            if item.kind == "video":
                item.path, item.frames = self._save_sheet(item.frames), []
            elif item.kind == "audio" and item.notes:  # show what was kept
                item.path = self._save_wav(item.value)
            items.append(item)
        if camera:
            frames, notes = self.policy.frames(list(camera), "camera")
            items.append(MediaItem("video", frames, self._save_sheet(frames), [camera_note, *notes]))
        if utterance is not None:
            try:
                wav, notes = model_audio(utterance.samples, utterance.sr, self.policy)
                items.append(MediaItem("audio", wav, self._save_wav(wav), notes))
            except MediaError as e:
                errors.append(str(e))
        return items, errors

    def add_turn(self, text: str, items: list[MediaItem]):
        """Add the user's turn; drop the oldest turns while the chat's media pass `max_bytes`.
        Returns (the turn, how many turns were dropped)."""
        turn = self.chat.add_user(text, items)
        dropped = 0
        while self.chat.nbytes() > self.max_bytes and self.chat.drop_oldest():
            dropped += 1
        return turn, dropped

    def clear(self) -> None:
        self.chat, self.shown, self.turns = Conversation(), [], 0
        self.prompt_cache.clear()

    def close(self, why: str) -> None:
        """Free everything the session holds (its chat, frames, recordings, files); idempotent."""
        self.closed = self.closed or why
        self.clear()
        self.window.clear()
        self.listener.reset()
        self.pending.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _save_sheet(self, frames) -> str:
        path = self.file(".png")
        contact_sheet(frames).save(path)
        return str(path)

    def _save_wav(self, wav) -> str:
        path = self.file(".wav")
        path.write_bytes(wav_bytes(wav, 16000))
        return str(path)


class Sessions:
    """The open sessions by key (Gradio's session hash). The caller passes the clock (`now`, in
    seconds), so idleness is decided by the events the server sees."""

    def __init__(self, root: Path, policy: MediaPolicy, frame_side: int, idle_s: float = 1800.0,
                 max_sessions: int = 64, max_bytes: int = MAX_SESSION_BYTES):
        self.root, self.policy, self.frame_side = root, policy, frame_side
        self.idle_s, self.max_sessions, self.max_bytes = idle_s, max_sessions, max_bytes
        self._open: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, key: str, now: float) -> Session:
        """A new session for `key` (a reload replaces the tab's old one), after freeing idle ones."""
        self.sweep(now)
        session = Session(self.root, self.policy, self.frame_side, self.max_bytes)
        session.last_used = now
        with self._lock:
            old = self._open.pop(key, None)
            self._open[key] = session
            over = sorted(self._open.items(), key=lambda kv: kv[1].last_used)[: max(0, len(self._open) - self.max_sessions)]
        if old is not None:
            old.close("the page was reloaded")
        for k, s in over:
            self.close(k, f"more than {self.max_sessions} sessions were open and it was the longest idle")
        return session

    def touch(self, session: Session, now: float) -> None:
        """An event of `session` at `now`: it is in use (raises SessionClosed if it was freed)."""
        session.check_open()
        session.last_used = now

    def close(self, key: str, why: str = "the tab was closed") -> None:
        with self._lock:
            session = self._open.pop(key, None)
        if session is not None:
            session.close(why)

    def sweep(self, now: float) -> int:
        """Close the sessions idle for more than `idle_s`; returns how many."""
        with self._lock:
            idle = [k for k, s in self._open.items() if now - s.last_used > self.idle_s]
        for key in idle:
            self.close(key, f"idle for more than {self.idle_s / 60:g} minutes")
        return len(idle)

    def close_all(self) -> None:
        for key in list(self._open):
            self.close(key, "the server stopped")

    def __len__(self) -> int:
        return len(self._open)

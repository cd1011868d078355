"""`omni demo`: a single-process Gradio app to talk to a model with webcam, microphone and files.

    omni demo --model runs/quickstart/final        # http://127.0.0.1:7860
    omni demo --model DIR --port 8000

Inputs: typed text with uploaded images / videos / audio (a multimodal textbox), a live webcam
(frames sampled at the model's video fps into a rolling window of its max frames, each frame
run through the image tower as it arrives), and a live microphone (chunks streamed to the
server; an energy VAD ends an utterance after a pause, or push-to-talk ends it on stop). A turn
carries the typed text, the uploads, the camera window as one `<video>` and the utterance as one
`<audio>`; the answer streams token by token from `omni.model.generate.LocalGenerator`, the same generator
`omni chat` makes, and the chat shows what the model was given. A model with a talker also speaks
the answer: its audio streams in chunks to a streaming audio player once the text is complete
(`DemoEngine.speak`). TTFT, tokens/s and the first audio chunk's time of every turn are shown under
the chat and logged. See docs/demo.md.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read by gradio at import and launch

log = logging.getLogger("omni.demo")
QUICKSTART_MODEL = Path("runs/quickstart/final")
WEBCAM_EVERY_S = 0.5   # the browser sends a webcam frame this often; the window keeps video.fps of them
VAD, PTT = "auto: pause ends speech (VAD)", "push-to-talk: stop ends speech"


def resolve_model_dir(model: str | None) -> Path:
    """The model folder to serve: `model`, else the quickstart's output; exits with what to run."""
    if model is None:
        for candidate in (QUICKSTART_MODEL, Path(__file__).resolve().parents[2] / QUICKSTART_MODEL):
            if (candidate / "omni_config.json").is_file():
                return candidate
        sys.exit(f"no --model given and there is no {QUICKSTART_MODEL}: run `make quickstart` to train "
                 "one (about 5 minutes on a CPU), or pass --model DIR")
    path = Path(model)
    if not path.is_dir():
        hint = " (`make quickstart` writes it)" if path == QUICKSTART_MODEL else ""
        sys.exit(f"--model {model}: no such folder{hint}")
    from omni.model.load import consolidate_first

    if consolidate_first(path):
        sys.exit(f"--model {consolidate_first(path)}")
    if not ((path / "omni_config.json").is_file() or (path / "config.json").is_file()):
        sys.exit(f"--model {model}: not a model folder (expected omni_config.json, as in a stage's final/ "
                 "or a checkpoint, or an `omni export` folder)")
    return path


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def build_app(model_dir: str | Path | None = None, max_new_tokens: int = 64, engine=None,
              pas: str | None = None, pas_endpoint_model: str = "default", idle_min: float = 30.0,
              max_sessions: int = 64, device: str | None = None, dtype: str | None = None, speak: bool = True):
    """The Gradio Blocks of the demo (not launched). `engine` lets a caller share a loaded model.
    A session is freed when its tab closes, after `idle_min` minutes without an event, or when
    more than `max_sessions` are open (omni/demo/sessions.py). `speak`: whether the "speak the
    answer" switch starts on (shown only for a model with a talker)."""
    import gradio as gr

    from omni.demo.engine import DemoEngine, TurnStats
    from omni.demo.session import Listener, MediaError, decode_wav_chunk, wav_bytes
    from omni.demo.sessions import Session, SessionClosed, Sessions
    from omni.errors import SampleError

    if engine is None:
        engine = DemoEngine(resolve_model_dir(None if model_dir is None else str(model_dir)),
                            max_new_tokens=max_new_tokens, pas=pas, pas_endpoint_model=pas_endpoint_model,
                            device=device, dtype=dtype)
    root = Path(tempfile.mkdtemp(prefix="omni-demo-"))  # recordings and contact sheets shown in the chat
    sessions = Sessions(root, engine.policy, engine.processor.image_config["image_size"], idle_s=idle_min * 60,
                        max_sessions=max_sessions)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    fps, max_frames = engine.video.fps, engine.video.max_frames
    # gradio encodes streamed audio for the browser with the ffmpeg CLI
    no_ffmpeg = engine.speaks and shutil.which("ffmpeg") is None
    if no_ffmpeg:
        log.warning("this model speaks, but ffmpeg is not installed: answers are text only "
                    "(`make browser` or `apt-get install -y ffmpeg` installs it)")

    def new_session(request: gr.Request):
        return sessions.open(request.session_hash or "local", time.monotonic())

    def end_session(request: gr.Request):  # the tab closed or reloaded: free it now, not in an hour
        sessions.close(request.session_hash or "local")

    # Gradio passes the request to a parameter type-hinted gr.Request; this module's hints are strings
    # that name a gradio imported in here, which typing cannot resolve, so give it the class itself.
    new_session.__annotations__["request"] = end_session.__annotations__["request"] = gr.Request

    def usable(session: Session | None) -> bool:
        """Marks the session in use; False (and a toast) when it is missing or was freed."""
        if session is None:
            return False
        try:
            sessions.touch(session, time.monotonic())
        except SessionClosed as e:
            gr.Warning(str(e))
            return False
        return True

    # ---- webcam: sample frames into the window and encode them while the user talks --------
    def on_frame(session: Session, frame):
        if frame is None or not usable(session):
            return gr.skip()
        now = time.monotonic()
        session.offer_frame(frame, now, engine.encode_ahead)
        w = session.window
        return (f"camera: {len(w)}/{max_frames} frames in the window ({w.span_s():.0f} s at {fps:g} fps), "
                f"each through the image tower on arrival ({_fmt_ms(session.ahead_s)})")

    # ---- microphone: chunks -> utterances ---------------------------------------------------
    def on_mode(session: Session, mode: str):
        if usable(session):
            session.listener = Listener("ptt" if mode == PTT else "vad")

    def on_start(session: Session, mode: str):
        if usable(session):
            session.listener = Listener("ptt" if mode == PTT else "vad")
            session.utterances = 0
        return "listening…"

    def _queue(session: Session, utterance) -> int:
        with session.lock:
            session.ahead_of = ()  # the next utterance prefills afresh
            session.pending.append((utterance, time.perf_counter()))
            session.utterances += 1
            session.triggers += 1
            return session.triggers  # a new value, so the hidden number's change event fires

    def on_chunk(session: Session, chunk_path, use_camera: bool):
        if not chunk_path or not usable(session):
            if chunk_path:
                Path(chunk_path).unlink(missing_ok=True)
            return gr.skip(), gr.skip()
        chunk = Path(chunk_path)
        try:
            sr, pcm = decode_wav_chunk(chunk.read_bytes())
            utterance = session.listener.feed(pcm, sr)
        except (MediaError, OSError) as e:
            return f"microphone: {e}", gr.skip()
        finally:  # 10 chunks a second would otherwise pile up in Gradio's upload folder
            chunk.unlink(missing_ok=True)
        lst = session.listener
        level = f"{lst.level_db:.0f} dBFS" if lst.level_db > -120 else "silent"
        if lst.mode == "ptt":
            state = f"recording {lst.recorded_s:.1f} s (stop sends it)"
        else:
            state = "hearing speech" if lst.open else "waiting for speech"
        status = f"microphone: {state} · level {level} (speech above {lst.threshold_db():.0f} dBFS)"
        if utterance is None:  # still speaking: what the turn already holds goes through the model now
            session.prefill_ahead(use_camera, time.monotonic(), engine.prefill_ahead)
            return status, gr.skip()
        log.info("session %s: utterance of %.2f s ended (%s)", session.id, utterance.samples.size / sr,
                 utterance.reason)
        return f"microphone: heard {utterance.speech_s:.1f} s of speech, answering…", _queue(session, utterance)

    def on_stop(session: Session):
        if not usable(session):
            return gr.skip(), gr.skip()
        utterance = session.listener.finish()
        if utterance is not None:
            return "microphone: stopped; answering…", _queue(session, utterance)
        if session.listener.only_silence and not session.utterances:
            gr.Warning("Heard only silence: nothing was sent.")
            return "microphone: heard only silence; nothing was sent", gr.skip()
        return "microphone: stopped", gr.skip()

    # ---- a turn -----------------------------------------------------------------------------
    def _turn(session: Session, box, max_tokens, use_camera, use_pas, speak, utterance, t_input: float,
              spoken_lag: float):
        if not usable(session):
            yield gr.skip(), gr.skip(), "session closed: reload the page", gr.skip()
            return
        text = ((box or {}).get("text") or "").strip()
        files = list((box or {}).get("files") or [])
        frames = session.window.snapshot(time.monotonic()) if use_camera else []
        note = f"camera: the last {len(frames)} frames ({session.window.span_s():.0f} s at {fps:g} fps)"
        items, errors = session.items(files, frames, note, utterance)
        if not text and not items and not errors:
            yield session.shown, gr.skip(), gr.skip(), gr.skip()
            return
        notes = [n for item in items for n in item.notes]
        model_text, complement = engine.augment(text) if use_pas and not errors else (text, "")
        if complement:
            notes.append(f"PAS: {complement}")
        shown_text = text + "".join(f"\n\n*{n}*" for n in notes)
        user_msg = {"role": "user", "content": [{"path": item.path} for item in items]
                    + ([shown_text] if shown_text else [])}
        session.shown.append(user_msg)
        if errors:
            for e in errors:
                gr.Warning(e)
            session.shown.append({"role": "assistant", "content": "⚠ " + "\n\n⚠ ".join(errors)
                                  + "\n\nNothing was sent to the model; fix the input and send again."})
            yield session.shown, {"text": text, "files": []}, "input refused: " + "; ".join(errors), gr.skip()
            return
        session.turns += 1
        n = session.turns
        turn, freed = session.add_turn(model_text, items)
        if freed:
            gr.Info(f"Dropped the {freed} oldest turn(s): the chat's media passed this session's "
                    f"{session.max_bytes / 2**20:.0f} MB memory budget.")
        answer_msg = {"role": "assistant", "content": ""}
        session.shown.append(answer_msg)
        yield session.shown, {"text": "", "files": []}, f"turn {n} · generating…", gr.skip()
        stats = TurnStats()
        answer = ""
        try:
            for piece in engine.answer(session.chat, stats, t_input, int(max_tokens), session.prompt_cache):
                answer += piece
                answer_msg["content"] = answer.strip()
                yield session.shown, gr.skip(), gr.skip(), gr.skip()
        except SampleError as e:
            session.chat.turns.pop()  # the turn just added (dropping never takes the last)
            answer_msg["content"] = f"⚠ the model cannot take this turn: {e}. Nothing was sent."
            yield session.shown, gr.skip(), f"turn {n} · refused: {e}", gr.skip()
            return
        if speak and engine.speaks and answer.strip():  # the talker reads the chat up to this turn, then the answer
            messages, media = session.chat.messages(), session.chat.media()
            for chunk in engine.speak(messages, media, answer, stats, t_input):
                if chunk.wave.size:
                    yield session.shown, gr.skip(), gr.skip(), wav_bytes(chunk.wave, engine.model.codec.sample_rate)
        turn.answer = answer.strip()
        if not turn.answer:
            answer_msg["content"] = "*(empty answer: the model emitted its end token first)*"
        line = f"turn {n} · {stats.line()}"
        if spoken_lag:
            line += f" · end of speech → first token {_fmt_ms(stats.ttft_s + spoken_lag)}"
            if stats.audio_chunks:
                line += f" · end of speech → first audio {_fmt_ms(stats.first_audio_s + spoken_lag)}"
        if stats.dropped:
            line += f" · {stats.dropped} oldest turn(s) dropped to fit the context"
            gr.Info(f"The conversation no longer fit the model's context: dropped the {stats.dropped} oldest turn(s).")
        log.info("session %s %s", session.id, line)
        yield session.shown, gr.skip(), line, gr.skip()

    def respond(session: Session, box, max_tokens, use_camera, use_pas, speak):
        yield from _turn(session, box, max_tokens, use_camera, use_pas, speak, None, time.perf_counter(), 0.0)

    def respond_voice(session: Session, box, max_tokens, use_camera, use_pas, speak):
        if not usable(session):
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        with session.lock:
            if not session.pending:
                yield session.shown, gr.skip(), gr.skip(), gr.skip()
                return
            utterance, t_end = session.pending.pop(0)
        # TTFT counts from when the VAD / stop closed the utterance; the pause it waited for is
        # added for "end of speech -> first token"
        lag = max(0.0, utterance.detected_s - utterance.end_s)
        yield from _turn(session, box, max_tokens, use_camera, use_pas, speak, utterance, t_end, lag)

    def clear(session: Session):
        if usable(session):
            session.clear()
        return [], {"text": "", "files": []}, ""

    with gr.Blocks(title="omni demo", analytics_enabled=False) as demo:
        # Gradio drops a closed tab's state only after an hour; `end_session` (unload) frees it at once
        session = gr.State(None, delete_callback=lambda s: s.close("expired") if s is not None else None)
        gr.Markdown(f"## omni — real-time demo\n{engine.describe()}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="chat", elem_id="omni-chat", height=560, buttons=["copy"], feedback_options=None,
                                     layout="bubble",
                                     placeholder="Type a question, attach images / videos / audio, or talk "
                                                 "to the camera and microphone on the right.")
                box = gr.MultimodalTextbox(elem_id="omni-input", file_count="multiple", sources=["upload"],
                                           placeholder="Ask something (Enter sends); the clip attaches images, videos, audio",
                                           show_label=False)
                metrics = gr.Markdown(elem_id="omni-metrics")
                speech = gr.Audio(streaming=True, autoplay=True, interactive=False, label="spoken answer",
                                  elem_id="omni-speech", visible=engine.speaks)
                with gr.Row():
                    max_tokens = gr.Slider(1, 512, value=engine.max_new_tokens, step=1, label="max new tokens")
                    clear_btn = gr.Button("Clear chat", elem_id="omni-clear")
                use_pas = gr.Checkbox(value=engine.augmenter is not None, visible=engine.augmenter is not None,
                                      label="PAS: add the prompt-augmentation model's complement to each typed turn",
                                      elem_id="omni-pas")
                speak_switch = gr.Checkbox(
                    value=speak and not no_ffmpeg, visible=engine.speaks, interactive=not no_ffmpeg,
                    label="speak the answer (ffmpeg is missing: `make browser` installs it)" if no_ffmpeg else
                    "speak the answer: the model's talker, streamed as it speaks", elem_id="omni-speak")
            with gr.Column(scale=2):
                cam = gr.Image(sources=["webcam"], streaming=True, type="pil", label="camera", height=300,
                               elem_id="omni-camera", webcam_options=gr.WebcamOptions(mirror=False))
                use_camera = gr.Checkbox(value=True, label="send the camera's last frames with each turn")
                cam_status = gr.Markdown("camera: off", elem_id="omni-camera-status")
                mic = gr.Audio(sources=["microphone"], streaming=True, type="filepath", label="microphone",
                               elem_id="omni-mic")
                mode = gr.Radio([VAD, PTT], value=VAD, show_label=False)
                mic_status = gr.Markdown("microphone: off", elem_id="omni-mic-status")
                utterance_ready = gr.Number(value=0, visible="hidden", elem_id="omni-utterance")

        demo.load(new_session, None, session)
        demo.unload(end_session)
        outputs = [chatbot, box, metrics]
        inputs = [session, box, max_tokens, use_camera, use_pas, speak_switch]
        box.submit(respond, inputs, [*outputs, speech], concurrency_id="generate", concurrency_limit=1)
        utterance_ready.change(respond_voice, inputs, [*outputs, speech], concurrency_id="generate",
                               concurrency_limit=1)
        cam.stream(on_frame, [session, cam], [cam_status], stream_every=WEBCAM_EVERY_S, concurrency_limit=None,
                   show_progress="hidden")
        mic.start_recording(on_start, [session, mode], [mic_status], concurrency_limit=None,
                            show_progress="hidden")
        mic.stream(on_chunk, [session, mic, use_camera], [mic_status, utterance_ready], concurrency_limit=None,
                   show_progress="hidden")
        mic.stop_recording(on_stop, [session], [mic_status, utterance_ready], concurrency_limit=None,
                           show_progress="hidden")
        mode.change(on_mode, [session, mode], None)
        clear_btn.click(clear, [session], outputs)
        chatbot.clear(clear, [session], outputs)
    demo.omni_engine = engine
    demo.omni_sessions = sessions
    demo.omni_tmp = root
    return demo


def launch(model_dir: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, max_new_tokens: int = 64, queue_size: int = 64,
           pas: str | None = None, pas_endpoint_model: str = "default", idle_min: float = 30.0,
           device: str | None = None, dtype: str | None = None, speak: bool = True):
    """Build and serve the demo (blocks). Generation runs one turn at a time; other sessions wait
    in Gradio's queue (at most `queue_size`, then they are told the queue is full)."""
    import gradio as gr

    demo = build_app(model_dir, max_new_tokens, pas=pas, pas_endpoint_model=pas_endpoint_model, idle_min=idle_min,
                     device=device, dtype=dtype, speak=speak)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts to fetch
    demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(demo.omni_tmp)],
                show_error=True, max_file_size="200mb", footer_links=[], theme=theme, ssr_mode=False)
    return demo

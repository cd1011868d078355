"""Real-time browser demo (Gradio, single process): `omni demo` / `python demos/app.py`.

`build_app(model_dir)` returns the gr.Blocks, `launch(...)` serves it; `session` holds the
UI-free parts (rolling webcam window, energy VAD, upload checks, conversation) and `engine` the
model side (frames encoded ahead, `stream_answer` with TTFT and tokens/s). Gradio is imported
only when an app is built.
"""
from omni.demo.app import add_demo_command, build_app, launch

__all__ = ["add_demo_command", "build_app", "launch"]

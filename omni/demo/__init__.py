"""Real-time browser demo (Gradio, single process), launched by `omni demo`.

`app` holds the UI (`build_app` returns the gr.Blocks, `launch` serves it; omni/cli/demo.py
registers the verb); `session` the UI-free parts (rolling webcam window, energy VAD, upload
checks, conversation); `sessions` the browser sessions and what bounds and frees their memory;
`engine` the model side (frames encoded ahead, streamed answers with TTFT and tokens/s, and, for a
model with a talker, the spoken answer streamed in chunks). Gradio is imported only when an app is
built.
"""

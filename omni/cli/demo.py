"""`omni demo`'s options (the app itself: omni/demo/app.py, imported only when it runs)."""
from __future__ import annotations

import argparse

from omni.cli.args import port_number, positive_float, positive_int


def _demo(args) -> None:
    from omni.demo.app import launch

    launch(args.model, args.host, args.port, args.share, args.max_new_tokens, pas=args.pas,
           pas_endpoint_model=args.pas_endpoint_model, idle_min=args.idle_min, device=args.device, dtype=args.dtype,
           speak=not args.no_speak)


def add_demo_command(subparsers) -> argparse.ArgumentParser:
    """Register `omni demo` on the `omni` parser's subparsers (as omni.cli.main.build_parser does)."""
    from omni.inference import add_placement_arguments

    p = subparsers.add_parser("demo", help="real-time browser demo: webcam, microphone, files and chat")
    p.add_argument("--model", help="model folder: a stage's final/, a checkpoint, or an export "
                                   "(default: runs/quickstart/final, written by `make quickstart`)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, help="port (default 7860, or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--idle-min", type=positive_float, default=30.0,
                   help="free a browser session's chat and media after this many minutes without an event (default 30)")
    p.add_argument("--pas", metavar="MODEL|URL",
                   help="prompt augmentation in front of the model: a PAS model folder (`omni align pas train`) or "
                        "an endpoint serving one; a checkbox in the page turns it off")
    p.add_argument("--pas-endpoint-model", default="default", help="model name to ask a --pas endpoint for")
    p.add_argument("--no-speak", action="store_true",
                   help="a model with a talker speaks its answers by default (a switch in the page); start with "
                        "the switch off")
    add_placement_arguments(p)
    p.set_defaults(func=_demo)
    return p

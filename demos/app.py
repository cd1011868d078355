"""Launch the real-time demo: `python demos/app.py --model runs/quickstart/final` (same as `omni demo`).

Everything lives in omni/demo (app.py: the Gradio UI; session.py: frame window, VAD, media checks;
engine.py: model loading, frames encoded ahead, streamed answers with timings).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from omni.demo.app import main

if __name__ == "__main__":
    main()

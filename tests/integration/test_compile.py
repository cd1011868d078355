"""`compile: true` compiles the LLM's decoder layers and the towers' blocks (torch.compile, in place):
the stage trains to the same losses and weights as without, and its parameter names are unchanged."""
from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors.torch import load_file

from omni.train.config import load_stage
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]


def _run(corpus, out: Path, compile: bool):
    # one layer per stack keeps inductor's CPU compile short; text, image and audio samples run
    # every compiled block kind
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml", [
        f"data.manifest={corpus}", "init_from=null", "steps=2", "batch.micro_batch=2", "log.interval=1",
        "data.datasets={text_arith: 1.0, image_colour: 1.0, audio_note: 1.0}", f"compile={str(compile).lower()}",
        "model_overrides=[llm.hf_config.num_hidden_layers=1, image.vision_cfg.layers=1, audio.n_layer=1]"])
    final = train_stage(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(final / "model.safetensors")


def test_compiled_stage_trains_like_the_eager_one(tmp_path, tiny_corpus):
    eager_rows, eager_weights = _run(tiny_corpus, tmp_path / "eager", compile=False)
    compiled_rows, compiled_weights = _run(tiny_corpus, tmp_path / "compiled", compile=True)
    assert len(compiled_rows) == len(eager_rows) == 2
    for c, e in zip(compiled_rows, eager_rows):
        assert math.isclose(c["loss"], e["loss"], rel_tol=1e-4), (c["step"], c["loss"], e["loss"])
        assert math.isclose(c["grad_norm"], e["grad_norm"], rel_tol=1e-3), (c["step"], c["grad_norm"], e["grad_norm"])
    assert compiled_weights.keys() == eager_weights.keys()
    for name, w in eager_weights.items():
        assert (compiled_weights[name] - w).abs().max() < 1e-4, name

"""A tiny LoRA run learns: LoRA on the LLM's attention and MLP, the image tower and projectors
trained fully, on the image-colour task only, over the trained tiny model. Its held-out accuracy (greedy answers,
`omni eval`'s scoring) ends clearly above the starting model's and above chance, and its log
names the trainable parameter count: the adapters plus the fully trained modules, exactly the
tensors of the adapter it wrote."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from omni.eval import evaluate
from omni.train.config import load_stage
from omni.train.trainer import train_stage

ROOT = Path(__file__).resolve().parents[2]
TASK = "image_colour"


@pytest.fixture(scope="module")
def run(tiny_corpus, trained_tiny, tmp_path_factory):
    cfg = load_stage(ROOT / "stages/tiny/2_sft.yaml",
                     [f"data.manifest={tiny_corpus}", f"init_from={trained_tiny}", "steps=40", "batch.micro_batch=8",
                      "optim.lr=5e-3", "data.shuffle_buffer=20", f"data.datasets={{{TASK}: 1.0}}", "lora.rank=8",
                      "lora.alpha=16", "lora.targets=[llm.model.layers.*.self_attn.*, llm.model.layers.*.mlp.*]",
                      "trainable=[encoders.image.*, projectors.*]"])
    records = []
    handler, logger = logging.Handler(logging.INFO), logging.getLogger("omni")
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        final = train_stage(cfg, tmp_path_factory.mktemp("lora-learning") / "run", progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return final, [r.getMessage() for r in records]


def test_lora_lifts_held_out_accuracy_above_the_base_and_chance(run, trained_tiny, tiny_corpus):
    final, _ = run
    base = evaluate(trained_tiny, tiny_corpus, datasets=[TASK], progress=False)["image"]
    tuned = evaluate(final, tiny_corpus, datasets=[TASK], progress=False)["image"]
    print(f"\nheld-out {TASK}: base {base['accuracy']:.2f} -> LoRA {tuned['accuracy']:.2f} "
          f"(chance {tuned['chance']:.2f}, n {tuned['n']})")
    assert tuned["n"] >= 10
    assert tuned["accuracy"] >= base["accuracy"] + 0.3
    assert tuned["accuracy"] >= tuned["chance"] + 0.3


def test_the_log_names_the_trainable_count_the_adapters_and_the_fully_trained_modules(run):
    final, logs = run
    line = next(m for m in logs if "parameters trainable" in m)
    n_train, n_all = map(int, re.search(r": (\d+)/(\d+) parameters trainable", line).groups())
    adapter = load_file(final / "adapter/adapter_model.safetensors")  # LoRA A/B, the tower and the projectors
    assert n_train == sum(t.numel() for t in adapter.values())
    assert any(".lora_A." in k for k in adapter) and any(".encoders.image." in k for k in adapter)
    assert 0 < n_train < n_all

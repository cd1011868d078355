"""LoRA on a stage (peft): a tiny LoRA stage on top of a trained tiny model, LoRA on the LLM's
attention and MLP plus the image projector trained fully. Its log names the trainable count (the
adapter file's tensors exactly), `final/` is the merged model and its logits equal the live
adapter model's (peft's PeftModel over the starting model), the exports' too: the merged
`omni export` and the `--adapter-only` folder that PeftModel loads over the exported base."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from omni.export.writer import export_model
from omni.model.load import load_model
from omni.model.processor import OmniProcessor, collate
from omni.train.config import load_stage
from omni.train.trainer import train_stage
from tests.helpers import cli_error

ROOT = Path(__file__).resolve().parents[2]
LORA = ["lora.rank=4", "lora.alpha=8", "lora.targets=[llm.model.layers.*.self_attn.*, llm.model.layers.*.mlp.*]",
        "trainable=[projectors.image.*]"]


def lora_stage(manifest, base, *extra):
    return load_stage(ROOT / "stages/tiny/2_sft.yaml",
                      [f"data.manifest={manifest}", f"init_from={base}", "steps=3", "batch.micro_batch=4",
                       "data.shuffle_buffer=20", "optim.lr=3e-3", *LORA, *extra])


@pytest.fixture(scope="module")
def run(tiny_corpus, trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    records = []
    handler, logger = logging.Handler(logging.INFO), logging.getLogger("omni")
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train_stage(lora_stage(tiny_corpus, trained_tiny), out, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, [r.getMessage() for r in records]


def _inputs(model_dir):
    """An image question through the training processor (the projector's input counts)."""
    model, tok = load_model(model_dir)
    proc = OmniProcessor.from_config(model.config, tok, model.token_ids)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ex = proc([{"role": "user", "content": "<image> What colour is the shape?"}], {"image": [image]},
              add_generation_prompt=True)
    return collate([ex], tok.pad_token_id)


def test_a_lora_stage_trains_the_adapters_and_the_projector_and_logs_their_count(run, trained_tiny):
    out, logs = run
    adapter = load_file(out / "final/adapter/adapter_model.safetensors")
    n_adapter = sum(t.numel() for t in adapter.values())  # LoRA A/B and the projector, nothing else
    assert any(k.endswith("lora_A.weight") for k in adapter) and any(".projectors.image." in k for k in adapter)
    line = next(m for m in logs if "parameters trainable" in m)
    assert f": {n_adapter}/" in line
    assert any("lora: rank 4" in m and "adapter parameters" in m for m in logs)
    merged, base = load_file(out / "final/model.safetensors"), load_file(trained_tiny / "model.safetensors")
    assert merged.keys() == base.keys()  # plain names: no base_layer / lora_ tensors
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter is merged in
    assert torch.equal(merged["llm.model.embed_tokens.weight"], base["llm.model.embed_tokens.weight"])
    assert not torch.equal(merged["projectors.image.linear_1.weight"], base["projectors.image.linear_1.weight"])


def test_merged_final_and_exports_give_the_adapter_models_logits(run, trained_tiny, tmp_path):
    out, _ = run
    batch = _inputs(trained_tiny)
    merged, _ = load_model(out / "final")
    live = PeftModel.from_pretrained(load_model(trained_tiny)[0], out / "final/adapter")  # peft's adapter model
    with torch.no_grad():
        want = live(batch.input_ids, batch.attention_mask, media=batch.media).logits
        got = merged(batch.input_ids, batch.attention_mask, media=batch.media).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    export_model(trained_tiny, tmp_path / "base")
    export_model(out, tmp_path / "merged")
    export_model(out, tmp_path / "adapter", adapter_only=True)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    hf = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.media.image,
          "image_tiles": batch.media.image_tiles}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=True),
                                        tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(exported(**hf).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(on_base(**hf).logits, want, rtol=0, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base", trust_remote_code=True)(**hf).logits
    assert (plain - want).abs().max() > 1e-3  # the adapter (and the projector) change the answer


def test_adapter_only_export_of_a_model_without_adapter_says_what_to_do(trained_tiny, tmp_path):
    msg = cli_error("export", "--ckpt", str(trained_tiny), "--out", str(tmp_path / "x"), "--adapter-only")
    assert "no LoRA adapter" in msg and "without --adapter-only" in msg

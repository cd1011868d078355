"""bench/gpu_projection.py (computed 7B figures) keeps running, and its FLOPs follow the formula's bounds:
a stage that trains everything costs at least PaLM's 6 x N per token for the LLM's matmuls alone, a
stage with the LLM frozen (the gradient still flows through it) at least 4 x N and less than the
everything-trainable stage."""
from __future__ import annotations

import json

from tests.helpers import load_bench

QWEN2_7B_MATMUL = 7_615_616_512 - 152_064 * 3_584  # the LLM without its input embedding table (LM head kept)


def test_projection_rows_follow_the_flops_formula(capsys):
    load_bench("gpu_projection").main(["--stages", "1a_image_projector", "2_sft", "--cpu-mfu", "0.2", "--json"])
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    sft, projector = rows["2_sft"], rows["1a_image_projector"]
    assert sft["gflop_per_token"] * 1e9 > 6 * QWEN2_7B_MATMUL
    assert 4 * QWEN2_7B_MATMUL < projector["gflop_per_token"] * 1e9 < sft["gflop_per_token"] * 1e9
    # at half the MFU a GPU-hour holds half the tokens
    ratio = sft["tokens_per_gpu_hour@mfu"] / sft["tokens_per_gpu_hour@cpu_mfu"]
    assert abs(ratio - 0.4 / 0.2) < 1e-9
    assert sft["plan_gib"]["fsdp2"] < sft["plan_gib"]["ddp"]  # sharding pays


def test_table_says_it_is_computed(capsys):
    load_bench("gpu_projection").main(["--stages", "1e_audio"])
    out = capsys.readouterr().out
    assert out.startswith("COMPUTED (not measured)") and "| 1e_audio | fsdp2 |" in out

"""bench/gpu_acceptance.py stays alive without a GPU: its CPU mode runs the same checks (packed vs
alone logits, one FSDP2 and one DeepSpeed ZeRO-3 step, one QLoRA step, the plan) on the tiny preset."""
from __future__ import annotations

import math

from tests.helpers import load_bench


def test_cpu_mode_runs_every_check_and_prints_one_table():
    bench = load_bench("gpu_acceptance")
    rows = bench.run(cpu=True, steps=1, samples=4, pack=256)
    assert [r["check"] for r in rows] == ["packed vs alone logits", "fsdp2 step", "deepspeed zero3 step",
                                          "fsdp2 vs zero3 loss", "qlora step"]
    assert all(r["ok"] for r in rows), bench.table(rows)
    parity, fsdp2, zero3, _, qlora = rows
    assert math.isfinite(qlora["loss"]) and qlora["tokens"] > 0 and qlora["engine"] == "ddp, 4-bit base"
    assert parity["value"] <= 1e-4 and "sdpa" in parity["what"]
    for r in (fsdp2, zero3):
        assert math.isfinite(r["loss"]) and r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["peak_gib"] is None and r["mfu"] is None and r["plan_gib"] > 0  # no GPU: no memory, no peak
    assert (fsdp2["engine"], zero3["engine"]) == ("fsdp2", "zero3")
    assert abs(fsdp2["loss"] - zero3["loss"]) <= 1e-4      # same weights, same batch
    lines = bench.table(rows).splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].split()[:2] == ["check", "result"]

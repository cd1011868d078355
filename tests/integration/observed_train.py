"""`python observed_train.py ARGS` = `omni ARGS` (launched by torchrun like it), plus two records
the tests read back; the training itself is the real, unchanged run.

- At every resumable checkpoint, right after it is written, the live model's logits on a fixed
  text batch (every rank runs the forward, as a sharded engine needs; rank 0 writes
  OUT/live-logits/step-N.pt): what `omni consolidate` of that checkpoint must reproduce.
- Around DeepSpeed's setup, per rank, OUT/deepspeed-setup/rank-R.json: the parameter elements the
  rank held in full (in memory, not partitioned) when the engine got the model and, at most, at
  any `deepspeed.zero.Init` during setup; after setup the elements of its ZeRO-3 partitions, of
  the full model and of its largest module.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: this checkout's omni
import omni.train.trainer as trainer  # noqa: E402
from omni.cli.main import main  # noqa: E402
from omni.train.engines import DeepSpeedEngine  # noqa: E402

TEXT = ["A fixed prompt the live model and the consolidated one both score.", "And a second, shorter one."]


def live_logits(module, tokenizer) -> torch.Tensor:
    """The module's output on TEXT: the LM's logits, or a reward model's rewards."""
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    module.eval()
    with torch.no_grad():
        out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return getattr(out, "logits", out).float().cpu()


def observed_save(save):
    def wrapped(engine, tokenizer, step, *args, **kwargs):
        target = save(engine, tokenizer, step, *args, **kwargs)
        logits = live_logits(engine.inference_module, tokenizer)
        engine.train()
        if engine.world.main:
            out = target.parent.parent / "live-logits"
            out.mkdir(exist_ok=True)
            torch.save(logits, out / f"step-{step:08d}.pt")
        return target
    return wrapped


def _unpartitioned(model) -> int:
    """Parameter elements this rank holds in full: in memory (not meta) and not a ZeRO-3 partition."""
    return sum(p.numel() for p in model.parameters() if not p.is_meta and not hasattr(p, "ds_id"))


def _observed_setup(setup, out_dir: Path):
    def wrapped(self, model):
        import deepspeed

        held_before, peak = _unpartitioned(model), [0]
        init = deepspeed.zero.Init.__init__

        def counting(zero_init, *args, **kwargs):  # DeepSpeed's own, after noting what is held in full
            peak[0] = max(peak[0], _unpartitioned(model))
            init(zero_init, *args, **kwargs)

        deepspeed.zero.Init.__init__ = counting
        try:
            setup(self, model)
        finally:
            deepspeed.zero.Init.__init__ = init
        params = list(model.parameters())
        record = {"held_before_setup": held_before, "most_held_in_setup": peak[0],
                  "largest_module": max(sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters(recurse=False))
                                        for m in model.modules()),
                  "partition_after_setup": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
                  "full_model": sum(getattr(p, "ds_numel", p.numel()) for p in params)}
        out = out_dir / "deepspeed-setup"
        out.mkdir(exist_ok=True)
        (out / f"rank-{self.world.rank}.json").write_text(json.dumps(record))
    return wrapped


if __name__ == "__main__":
    trainer.save_resumable = observed_save(trainer.save_resumable)
    DeepSpeedEngine.setup = _observed_setup(DeepSpeedEngine.setup, Path(sys.argv[sys.argv.index("--out") + 1]))
    main(sys.argv[1:])

"""`omni consolidate`: a sharded checkpoint becomes a model folder that export, chat and eval take.

That the consolidated weights are the live model's, for a 2-process run of every engine, is in
tests/integration/test_distributed.py (test_a_mid_run_checkpoint_consolidates_to_the_live_model);
here a one-process fsdp2 run (its checkpoint is DCP shards all the same) feeds the commands that
read model folders, a reward model keeps its head, frozen modules survive ZeRO-3, and bad input
gets one line (also a sharded checkpoint given where a model folder is needed: consolidate it first).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from omni.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fsdp2_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    out = tmp_path_factory.mktemp("fsdp2-one")
    train_stage(load_stage(ROOT / "stages/tiny/2_sft.yaml", [
        f"data.manifest={tiny_corpus}", "init_from=null", "steps=2", "checkpoint.interval=1", "batch.micro_batch=2",
        "data.shuffle_buffer=20", "engine=fsdp2"]), out, progress=False)
    return out / "checkpoints/step-00000001"


def test_a_consolidated_fsdp2_checkpoint_exports_chats_and_evaluates(fsdp2_checkpoint, tiny_corpus, tmp_path,
                                                                      capsys):
    assert (fsdp2_checkpoint / "dcp").is_dir() and not (fsdp2_checkpoint / "model.safetensors").exists()
    model = tmp_path / "model"
    main(["-q", "consolidate", str(fsdp2_checkpoint), "--out", str(model)])
    main(["-q", "export", "--ckpt", str(model), "--out", str(tmp_path / "export")])
    assert json.loads((tmp_path / "export/config.json").read_text())["model_type"] == "omni_mllm"
    main(["-q", "chat", str(model), "--prompt", "What shape is it?", "--max-new-tokens", "3"])
    main(["-q", "eval", str(model), "--data", str(tiny_corpus), "--limit", "2", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert f"model folder: {model}" in printed and "accuracy" in printed


def test_a_reward_model_checkpoint_consolidates_with_its_head(tmp_path, monkeypatch):
    """method rm trains a wrapper (the LM plus a value head): the consolidated folder is a reward
    model folder whose rewards are the live ones at the checkpoint's step (fsdp2, one process)."""
    import omni.train.trainer as trainer
    from omni.align.objectives.rm import RewardModel
    from omni.train.config import load_stage
    from tests.integration.observed_train import live_logits, observed_save

    main(["-q", "align", "synth", "--out", str(tmp_path / "synth")])
    synth = tmp_path / "synth"
    monkeypatch.setattr(trainer, "save_resumable", observed_save(trainer.save_resumable))
    trainer.train_stage(load_stage(ROOT / "omni/align/configs/tiny_rm.yaml", [
        f"init_from={synth}/base", f"data.records={synth}/pref_train.jsonl", "data.eval=null", "steps=2",
        "checkpoint.interval=1", "engine=fsdp2"]), tmp_path / "rm", progress=False)
    main(["-q", "consolidate", str(tmp_path / "rm/checkpoints/step-00000001"), "--out", str(tmp_path / "model")])
    reward_model, tokenizer = RewardModel.from_pretrained(tmp_path / "model")
    live = torch.load(tmp_path / "rm/live-logits/step-00000001.pt")
    torch.testing.assert_close(live_logits(reward_model, tokenizer), live, rtol=0, atol=1e-5)


def test_a_deepspeed_checkpoint_with_frozen_modules_consolidates(tiny_corpus, tmp_path):
    """The 7B stages freeze most of the model: ZeRO-3 saves frozen parameters apart from the
    optimizer's partitions, and zero_to_fp32 must bring both back (one process, in its own)."""
    import os
    import subprocess
    import sys

    from omni.model.load import load_model
    from tests.integration.observed_train import live_logits

    run = tmp_path / "zero3"
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("observed_train.py")), "-q", "train",
                           str(ROOT / "stages/tiny/2_sft.yaml"), "--out", str(run), f"data.manifest={tiny_corpus}",
                           "init_from=null", "steps=2", "checkpoint.interval=1", "batch.micro_batch=2",
                           "data.shuffle_buffer=20", "engine=deepspeed", "zero_stage=3",
                           "trainable=[projectors.image.*,encoders.image.*,llm.model.layers.1.*]"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    main(["-q", "consolidate", str(run / "checkpoints/step-00000001"), "--out", str(tmp_path / "model")])
    model, tokenizer = load_model(tmp_path / "model")
    torch.testing.assert_close(live_logits(model, tokenizer), torch.load(run / "live-logits/step-00000001.pt"),
                               rtol=0, atol=1e-5)
    _asks_for_consolidate(run / "checkpoints/step-00000001", run / "checkpoints/step-00000001", tmp_path)


def _asks_for_consolidate(given: Path, ckpt: Path, tmp_path: Path) -> None:
    """export, chat, eval and demo given `given` (a sharded checkpoint, or a stage folder whose newest
    checkpoint `ckpt` is one): one line naming the checkpoint and the `omni consolidate` to run."""
    from tests.helpers import cli_error

    hint = (f"{ckpt} is an fsdp2/DeepSpeed checkpoint (sharded weights, no model folder): "
            f"run `omni consolidate {ckpt} --out DIR` first, then use DIR")
    for argv, prefix in ((["export", "--ckpt", str(given), "--out", str(tmp_path / "x")], "export error: --ckpt "),
                         (["chat", str(given), "--prompt", "hi"], "config error: "),
                         (["eval", str(given), "--data", "m.yaml"], "config error: "),
                         (["demo", "--model", str(given)], "--model ")):
        assert cli_error("-q", *argv) == prefix + hint, argv
    assert not (tmp_path / "x").exists()


def test_a_sharded_checkpoint_or_a_stage_with_only_those_asks_for_consolidate(fsdp2_checkpoint, tmp_path):
    stage = tmp_path / "stage"  # a stage stopped before final/: its checkpoints are all there is
    shutil.copytree(fsdp2_checkpoint.parent.parent, stage, ignore=shutil.ignore_patterns("final"))
    _asks_for_consolidate(fsdp2_checkpoint, fsdp2_checkpoint, tmp_path)
    _asks_for_consolidate(stage, stage / "checkpoints" / fsdp2_checkpoint.name, tmp_path)


def test_bad_input_gets_one_line(fsdp2_checkpoint, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="busy: exists and is not empty"):
        main(["-q", "consolidate", str(fsdp2_checkpoint), "--out", str(tmp_path / "busy")])
    assert (tmp_path / "busy/keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="no trainer_state.pt; not a checkpoint omni wrote"):
        main(["-q", "consolidate", str(tmp_path), "--out", str(tmp_path / "model")])


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_mid_run_speech_out_checkpoint_consolidates_with_its_fitted_codec(engine, tmp_path_factory):
    """A speech_out stage fits the tiny codec its talker learns to speak; a checkpoint of any engine
    keeps it, and the consolidated folder has it as final/ does: same codebooks, and it exports."""
    import numpy as np

    from omni.data import synth
    from omni.model.load import load_model
    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    tmp = tmp_path_factory.mktemp(f"speech-{engine}")
    voiced = synth.write_corpus(synth.SynthConfig(out_dir=str(tmp / "synth"), voice="en", train_per_task=6,
                                                  val_per_task=2, samples_per_shard=4, seed=0), False)
    train_stage(load_stage(ROOT / "stages/tiny/3_speech_out.yaml", [
        "init_from=null", f"data.manifest={voiced}", "data.datasets={audio_note: 1.0}", "steps=2",
        "checkpoint.interval=1", "batch.micro_batch=4", f"engine={engine}"]), tmp / "run", progress=False)
    ckpt = tmp / "run/checkpoints/step-00000001"
    assert (ckpt / "tiny_codec.json").is_file()
    main(["-q", "consolidate", str(ckpt), "--out", str(tmp / "model")])
    model, _ = load_model(tmp / "model")
    final, _ = load_model(tmp / "run/final")
    assert model.talker is not None and model.codec is not None
    assert np.array_equal(model.codec.centroids, final.codec.centroids) and model.codec.config == final.codec.config
    main(["-q", "export", "--ckpt", str(tmp / "model"), "--out", str(tmp / "export")])
    assert (tmp / "export/tiny_codec.safetensors").is_file()

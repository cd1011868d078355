"""Data parallelism and accumulation train exactly like one big batch, on every engine.

Real torchrun with the gloo backend: 2 processes x micro-batch 2 must give the loss curve of
1 process x micro-batch 4, and of 1 process x micro-batch 2 x accumulation 2 (ddp, fsdp2);
DeepSpeed ZeRO-2 and ZeRO-3 over 2 processes must give the curve of one DeepSpeed process.
A run killed with SIGKILL resumes step for step (ddp, fsdp2); DeepSpeed resumes exactly from a
mid-run checkpoint, and refuses one written by another number of processes (ddp and fsdp2 take it:
tests/integration/test_elastic_resume.py). ZeRO-3 builds the weights on rank 0 only. `omni consolidate`
turns a mid-run checkpoint of each engine into a model folder whose logits are the live model's at
that step (the 2-process runs go through observed_train.py, which records them).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# a stage whose FSDP2 units mix frozen and trainable parameters: the root holds the frozen
# embeddings and the trainable image projector, LLM layer 0 is frozen and layer 1 trains
MIXED = "trainable=[projectors.image.*,encoders.image.*,llm.model.layers.1.*]"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _command(out: Path, manifest, *extra, nproc: int = 1, observed: bool = False) -> list[str]:
    """`observed`: through observed_train.py, which also records the live logits at each checkpoint."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(_port())] if nproc > 1 else [sys.executable])
    omni = [str(Path(__file__).with_name("observed_train.py"))] if observed else ["-m", "omni.cli"]
    return launcher + omni + ["-q", "train", str(ROOT / "stages/tiny/2_sft.yaml"), "--out", str(out),
                       f"data.manifest={manifest}", "init_from=null", f"steps={STEPS}", "log.interval=1",
                       "data.shuffle_buffer=20", "optim.lr=3e-3", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# held-out scoring in the single-process reference and the 2-process fsdp2 and ZeRO-3 runs: 5 records
# over 2 ranks at micro-batch 2 leave rank 1 a batch short, which it must fill to keep in lockstep
EVAL_RECORDS = 5


def _held_out(manifest) -> tuple[str, ...]:
    return f"data.eval={manifest}", f"data.eval_limit={EVAL_RECORDS}"


def _train(out: Path, manifest, *extra, nproc: int = 1, observed: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(out, manifest, *extra, nproc=nproc, observed=observed), check=False,
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


_ports = iter(range(29500 + os.getpid() % 400 * 10, 65000))


def _port() -> int:
    return next(_ports)


def _same_weights(a: Path, b: Path, atol: float) -> None:
    """Two final/ folders: the same file format (keys, config) and weights within atol."""
    wa, wb = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    config_a, config_b = (json.loads((r / "final/omni_config.json").read_text()) for r in (a, b))
    config_a.pop("weights_sha256"), config_b.pop("weights_sha256")  # the bytes differ within atol
    assert config_a == config_b
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _train(out, tiny_corpus, "batch.micro_batch=4", "log.profile=true", *_held_out(tiny_corpus))
    return out


@pytest.fixture(scope="module")
def one_big_batch(reference):
    return _losses(reference)


def test_accumulation_equals_one_big_batch(one_big_batch, tiny_corpus, tmp_path):
    _train(tmp_path, tiny_corpus, "batch.micro_batch=2", "batch.grad_accum=2")
    assert _losses(tmp_path) == pytest.approx(one_big_batch, rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def ddp_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _train(out, tiny_corpus, "batch.micro_batch=2", "checkpoint.interval=1", nproc=2, observed=True)
    return out


def test_two_processes_equal_one_big_batch(one_big_batch, ddp_run):
    losses = _losses(ddp_run)
    assert len(losses) == STEPS
    assert losses == pytest.approx(one_big_batch, rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0]


def _kill_and_resume(manifest, tmp_path, *args, straight: Path, kill_after: int) -> Path:
    """Run `args` again (2 processes), SIGKILL it once its step-`kill_after` checkpoint is complete,
    resume it: the loss curve and final weights must equal those of the uninterrupted run `straight`."""
    expected = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed, manifest, *args, nproc=2), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / f"checkpoints/step-{kill_after:08d}/trainer_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    _train(killed, manifest, *args, nproc=2)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    restarts = [b["step"] for a, b in itertools.pairwise(rows) if b["step"] <= a["step"]]
    assert all(s > kill_after for s in restarts)  # it resumed from a checkpoint, not from step 1
    resumed = {row["step"]: row["loss"] for row in rows}  # later rows win: the resumed run's
    assert sorted(resumed) == sorted(expected)
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([expected[s] for s in sorted(expected)],
                                                                   rel=1e-6, abs=1e-7)
    _same_weights(straight, killed, atol=1e-6)
    return killed


def test_a_killed_two_process_run_resumes_step_for_step(tiny_corpus, tmp_path):
    args = ("batch.micro_batch=2", "steps=24", "checkpoint.interval=4", "checkpoint.keep=2")
    _train(tmp_path / "straight", tiny_corpus, *args, nproc=2)
    _kill_and_resume(tiny_corpus, tmp_path, *args, straight=tmp_path / "straight", kill_after=8)


# data.partition: shard — each rank and decode worker reads its own shards (docs/data.md)
# (20 steps: by the step-16 checkpoint each decode worker has handed over 16 items, so the checkpoint
# holds every worker's pipeline state and the resume seeks; omni/data/sharded.py STATE_EVERY)
SHARD = ("batch.micro_batch=2", "steps=20", "checkpoint.interval=8", "checkpoint.keep=2", "data.partition=shard",
         "data.workers=2")


def test_shard_partition_with_decode_workers_resumes_step_for_step(tiny_corpus, tmp_path):
    """2 processes x 2 DataLoader decode workers, each reading its own resampled shards: a SIGKILLed
    run resumes every worker's stream where it stopped (loss curve and weights step for step)."""
    _train(tmp_path / "straight", tiny_corpus, *SHARD, nproc=2)
    killed = _kill_and_resume(tiny_corpus, tmp_path, *SHARD, straight=tmp_path / "straight", kill_after=16)
    state = torch.load(killed / "checkpoints/step-00000016/trainer_state.pt", weights_only=True)
    assert [s["workers"] for s in state["samples"]] == [2, 2]  # per rank: per-worker positions
    assert [s["consumed"] for s in state["samples"]] == [[16, 16], [16, 16]]
    assert all(r is not None for s in state["samples"] for r in s["readers"])  # resumed by seeking, not replay
    losses = _losses(tmp_path / "straight")
    assert losses[-1] < losses[0]


# ---- FSDP2 -----------------------------------------------------------------------------------
# checkpoints at every step: they must not change the run, and the kill test resumes from them
FSDP2 = ("batch.micro_batch=2", "engine=fsdp2", "checkpoint.interval=1", "checkpoint.keep=2", "log.profile=true")


@pytest.fixture(scope="module")
def fsdp2_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    done = _train(out, tiny_corpus, *FSDP2, *_held_out(tiny_corpus), nproc=2, observed=True)
    (out / "console.log").write_text(done.stderr)
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_two_processes_equal_one_big_batch(reference, one_big_batch, fsdp2_run):
    assert _losses(fsdp2_run) == pytest.approx(one_big_batch, rel=1e-5, abs=1e-6)
    # profile: both ranks' tokens add up to the single process's; on CPU no MFU (no peak known)
    assert [r["tokens"] for r in _rows(fsdp2_run)] == [r["tokens"] for r in _rows(reference)]
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and r["mfu"] is None for r in _rows(fsdp2_run))
    _same_weights(reference, fsdp2_run, atol=1e-4)  # gathered on rank 0 into the same single file
    shards = sorted(p.name for p in (fsdp2_run / "checkpoints/step-00000003/dcp").glob("*.distcp"))
    assert len(shards) == 2  # torch.distributed.checkpoint: one file per rank


def test_a_killed_fsdp2_run_resumes_step_for_step(fsdp2_run, tiny_corpus, tmp_path):
    _kill_and_resume(tiny_corpus, tmp_path, *FSDP2, straight=fsdp2_run, kill_after=1)


def test_fsdp2_units_mixing_frozen_and_trainable_parameters(tiny_corpus, tmp_path):
    _train(tmp_path / "ddp", tiny_corpus, "batch.micro_batch=4", MIXED)
    _train(tmp_path / "fsdp2", tiny_corpus, "batch.micro_batch=2", "engine=fsdp2", MIXED, nproc=2)
    losses = _losses(tmp_path / "fsdp2")
    assert losses == pytest.approx(_losses(tmp_path / "ddp"), rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0]
    _same_weights(tmp_path / "ddp", tmp_path / "fsdp2", atol=1e-4)


def test_resuming_with_another_engine_or_world_size_is_refused(tiny_corpus, tmp_path):
    from omni.config import ConfigError
    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    args = [f"data.manifest={tiny_corpus}", "init_from=null", "steps=2", "checkpoint.interval=1",
            "batch.micro_batch=2", "data.shuffle_buffer=20", "optim.lr=3e-4"]
    train_stage(load_stage(ROOT / "stages/tiny/2_sft.yaml", args), tmp_path, progress=False)
    (tmp_path / "final").rename(tmp_path / "done")
    with pytest.raises(ConfigError, match="engine ddp with 1 process.*this run is fsdp2 with 1"):
        train_stage(load_stage(ROOT / "stages/tiny/2_sft.yaml", [*args, "engine=fsdp2"]), tmp_path, progress=False)
    # another number of processes is fine for ddp (tests/integration/test_elastic_resume.py), another global batch is not
    done = subprocess.run(_command(tmp_path, tiny_corpus, *args[2:], nproc=2), check=False,
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode != 0
    assert "(global batch (processes x batch.micro_batch x batch.grad_accum): 1 x 2 x 1 = 2 -> 2 x 2 x 1 = 4)" \
        in done.stderr and "batch.grad_accum=" not in done.stderr  # 2 processes cannot make 2 of micro-batches of 2


def test_profile_reports_mfu_against_a_configured_peak(tiny_corpus, tmp_path):
    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    args = [f"data.manifest={tiny_corpus}", "init_from=null", "steps=2", "log.interval=1", "batch.micro_batch=2",
            "data.shuffle_buffer=20", "log.profile=true", "log.peak_tflops=0.01"]
    train_stage(load_stage(ROOT / "stages/tiny/2_sft.yaml", args), tmp_path, progress=False)
    for row in _rows(tmp_path):
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0
        assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.01, rel=1e-3)


# ---- DeepSpeed ZeRO --------------------------------------------------------------------------
DEEPSPEED = ("batch.micro_batch=2", "engine=deepspeed", "checkpoint.interval=1", "checkpoint.keep=2")


@pytest.fixture(scope="module")
def deepspeed_one_process(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed1")
    _train(out, tiny_corpus, "batch.micro_batch=4", "engine=deepspeed", "zero_stage=2", *_held_out(tiny_corpus))
    return out


@pytest.fixture(scope="module")
def zero2_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    _train(out, tiny_corpus, *DEEPSPEED, "zero_stage=2", nproc=2, observed=True)
    return out


@pytest.fixture(scope="module")
def zero3_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    done = _train(out, tiny_corpus, *DEEPSPEED, "zero_stage=3", *_held_out(tiny_corpus), nproc=2, observed=True)
    (out / "console.log").write_text(done.stderr)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_equal_one_process(stage, deepspeed_one_process, request):
    run = request.getfixturevalue(f"zero{stage}_run")
    losses = _losses(run)
    assert losses == pytest.approx(_losses(deepspeed_one_process), rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0]
    _same_weights(deepspeed_one_process, run, atol=1e-4)
    config = json.loads((run / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == stage and config["train_batch_size"] == 4
    shards = sorted(p.name for p in (run / "checkpoints/step-00000003/deepspeed").glob("*optim_states.pt"))
    assert len(shards) == 2  # DeepSpeed's own checkpoint: one optimizer shard per rank


@pytest.mark.parametrize("engine, single", [("fsdp2", "reference"), ("zero3", "deepspeed_one_process")])
def test_sharded_engines_split_held_out_scoring_over_ranks(engine, single, request):
    """FSDP2 and ZeRO-3 gather weights per module in every forward: the ranks score their own shares
    in lockstep (the same number of batches, the same modules) and give the 1-process numbers."""
    run, reference = request.getfixturevalue(f"{engine}_run"), request.getfixturevalue(single)
    console = (run / "console.log").read_text()
    for rank, share in ((0, 3), (1, 2)):
        assert console.count(f"rank {rank} scores {share} of {EVAL_RECORDS} records") == 2  # before and after
    one, two = (json.loads((r / "eval.json").read_text()) for r in (reference, run))
    for when in ("before", "after"):
        assert two[when]["tokens"] == one[when]["tokens"] > 0
        for key in ("loss", "token_accuracy"):
            assert two[when][key] == pytest.approx(one[when][key], rel=1e-5), (when, key)


def test_deepspeed_refuses_to_resume_on_another_number_of_processes(zero3_run, tiny_corpus, tmp_path):
    """ZeRO's checkpoint holds one optimizer partition per rank: a clear refusal, not a wrong run."""
    from omni.config import ConfigError
    from omni.train.config import load_stage
    from omni.train.trainer import train_stage

    shutil.copytree(zero3_run, tmp_path / "run", ignore=shutil.ignore_patterns("final"))
    args = [f"data.manifest={tiny_corpus}", "init_from=null", f"steps={STEPS}", "log.interval=1", "data.shuffle_buffer=20",
            "optim.lr=3e-3", "batch.micro_batch=4", "engine=deepspeed", "zero_stage=3", "checkpoint.interval=1"]
    with pytest.raises(ConfigError, match=r"deepspeed-zero3 with 2 process\(es\); this run is deepspeed-zero3 with 1\. "
                                          r".*cannot be re-split: resume on 2 process\(es\)"):
        train_stage(load_stage(ROOT / "stages/tiny/2_sft.yaml", args), tmp_path / "run", progress=False)


def test_deepspeed_zero3_resumes_from_a_mid_run_checkpoint_exactly(zero3_run, tiny_corpus, tmp_path):
    """The run as it was at its step-2 checkpoint (later checkpoint, metrics and model removed),
    resumed: DeepSpeed's load_checkpoint + omni's trainer state continue it step for step. (A kill
    mid-write is the same code for every engine: the ddp and fsdp2 kill tests above.)"""
    run = tmp_path / "resumed"
    shutil.copytree(zero3_run, run, ignore=shutil.ignore_patterns("final", "step-00000003"))
    rows = (zero3_run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 2))
    _train(run, tiny_corpus, *DEEPSPEED, "zero_stage=3", nproc=2)
    assert _losses(run) == pytest.approx(_losses(zero3_run), rel=1e-6, abs=1e-7)
    _same_weights(zero3_run, run, atol=1e-6)


def test_zero3_builds_the_weights_on_rank_0_only(zero3_run):
    """Ranks other than 0 get a meta-device skeleton (no parameter in memory), hold at most one
    module in full while DeepSpeed partitions it, and after setup their ZeRO-3 partition only: no
    rank but 0 ever holds a full copy of the model (observed_train.py records it)."""
    ranks = [json.loads((zero3_run / f"deepspeed-setup/rank-{r}.json").read_text()) for r in (0, 1)]
    full = ranks[0]["full_model"]
    assert ranks[0]["held_before_setup"] == full  # rank 0 builds (or reads) the weights
    assert ranks[1]["held_before_setup"] == 0
    assert 0 < ranks[1]["most_held_in_setup"] <= ranks[1]["largest_module"] < full / 10
    for rank in ranks:
        assert rank["full_model"] == full
        assert full / 2 <= rank["partition_after_setup"] < full / 2 * 1.01  # half each (plus padding)


# ---- omni consolidate: every engine's mid-run checkpoint -> a model folder -------------------
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_a_mid_run_checkpoint_consolidates_to_the_live_model(engine, request, tmp_path):
    """`omni consolidate` of the step-3 checkpoint (of 4 steps): the folder's model gives the logits
    the live, sharded model gave right after writing that checkpoint (observed_train.py)."""
    from omni.cli.main import main
    from omni.model.load import load_model
    from tests.integration.observed_train import live_logits

    run = request.getfixturevalue(f"{engine}_run")
    main(["-q", "consolidate", str(run / "checkpoints/step-00000003"), "--out", str(tmp_path / "model")])
    model, tokenizer = load_model(tmp_path / "model")
    live = torch.load(run / "live-logits/step-00000003.pt")
    torch.testing.assert_close(live_logits(model, tokenizer), live, rtol=0, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.safetensors", "omni_config.json",
                                                                      "tokenizer"]


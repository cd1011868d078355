"""Atomic checkpoints: written to a temporary folder, then renamed into place.

A run killed mid-write leaves either the previous checkpoint or the new one, never a torn
folder. Resumable checkpoints hold the full training state (weights, optimizer, scheduler,
every rank's RNGs and data stream position, step) so a resumed run continues exactly, for ddp
and fsdp2 also on another number of processes (the data positions re-split, docs/data.md). The
weights and optimizer are written by the engine (omni/train/engines.py), sharded where it
shards: ddp a model folder (`save_pretrained`) + the optimizer state, fsdp2 a
torch.distributed.checkpoint folder `dcp/`, deepspeed its own `deepspeed/` tag folder.
`trainer_state.pt` (rank 0, written last) holds the rest and names the engine and world size.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from omni.config import ConfigError
from omni.files import replace_dir

STATE = "trainer_state.pt"


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy: the RNGs `rng_state` saves and a run draws from."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """Every RNG a run draws from, as tensors, numbers and strings only (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resumable(engine, tokenizer, step: int, samples: list, ckpt_root: str | Path, keep: int,
                   counters: list, config: dict) -> Path:
    """Every rank calls it. `samples`: each rank's data stream position (`stream.state()`);
    `counters`: each rank's bad-sample counts (`SkipCounter.state()`); `config`: the stage config
    (a resume compares it with its own).
    The engine writes into `.step-N.tmp/` (a name all ranks know), rank 0 adds the trainer state
    and renames the folder to `step-N/` once every rank is done."""
    world = engine.world
    ckpt_root = Path(ckpt_root)
    target = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".{target.name}.tmp"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a torn write of an earlier, killed run
        tmp.mkdir(parents=True)
    world.barrier()
    rngs = world.gather(rng_state())
    extra = engine.save(tmp, tokenizer)
    world.barrier()
    if world.main:
        codec = getattr(engine.model, "codec", None)
        if hasattr(codec, "save"):  # speech out's fitted codec, kept by every engine (a ddp model folder has it)
            codec.save(tmp)
        torch.save({"engine": engine.description, "world_size": world.size, "step": step, "samples": samples,
                    "scheduler": engine.scheduler.state_dict(), "rng": rngs, "counters": counters,
                    "config": config, **extra}, tmp / STATE)
        replace_dir(tmp, target)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    world.barrier()
    return target


def latest_resumable(ckpt_root: str | Path) -> Path | None:
    done = sorted(p for p in Path(ckpt_root).glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def read_state(path: Path) -> dict:
    """A checkpoint's trainer state; `engine` names what wrote its weights (omni consolidate reads it too)."""
    if not (path / STATE).is_file():
        raise ConfigError(f"{path}: no {STATE}; not a checkpoint omni wrote (a checkpoints/step-N folder)")
    try:  # tensors, numbers and strings only: a checkpoint from elsewhere cannot run code here
        state = torch.load(path / STATE, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a refused or torn file
        raise ConfigError(f"{path / STATE}: not a training state omni wrote ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); remove {path} to resume from an earlier checkpoint") from None
    state.setdefault("engine", "ddp")  # checkpoints from before engines were named are ddp's
    state.setdefault("world_size", len(state["samples"]))
    return state


def read_resumable(path: Path, engine) -> dict:
    """The trainer state of checkpoint `path`, once it is known that `engine` can resume it: written
    by the same engine, on as many processes unless the engine reshards its checkpoints on load
    (`Engine.elastic`). Nothing is loaded yet."""
    state = read_state(path)
    written_by, world_size = state["engine"], state["world_size"]
    wrote = f"{path} was written by engine {written_by} with {world_size} process(es); this run is " \
            f"{engine.description} with {engine.world.size}."
    if written_by != engine.description:
        raise ConfigError(f"{wrote} Resume it with the same engine (stage keys engine, zero_stage), or train into "
                          "a new --out folder")
    if world_size != engine.world.size and not engine.elastic:
        raise ConfigError(f"{wrote} Its checkpoints hold one optimizer shard per process and cannot be re-split: "
                          f"resume on {world_size} process(es) (torchrun --nproc_per_node {world_size}), or train "
                          "into a new --out folder")
    return state


def load_resumable(path: Path, state: dict, engine) -> None:
    """Restore the engine's state in place from checkpoint `path` (`state`: its `read_resumable`):
    weights, optimizer (resharded by the engine on another number of processes), scheduler, RNGs.
    A rank the writing run did not have takes the RNGs of rank (its rank mod the old world size)."""
    engine.load(path, state)
    engine.scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    set_rng_state(rng[engine.world.rank % len(rng)] if isinstance(rng, list) else rng)

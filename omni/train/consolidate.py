"""`omni consolidate CKPT --out DIR`: any engine's resumable checkpoint -> a normal model folder.

A ddp checkpoint is a model folder already (it is read and written again, without the optimizer
and trainer state). An fsdp2 checkpoint (`dcp/`, torch.distributed.checkpoint, one file per rank)
and a DeepSpeed one (`deepspeed/`, ZeRO-2/3 partitions) are read whole in one process, without a
process group or an accelerator, by their libraries' own readers: `dcp.load` into the model's
state dict, DeepSpeed's `zero_to_fp32`. Both hold the fp32 master weights, as the trainer's
`final/` does. The model to write them into is the one the run trained, rebuilt from the stage
config the checkpoint holds (`trainer_state.pt`) the way ranks other than 0 build it: on the meta
device, no weights read (the stage's `init_from` folder or preset gives the architecture and the
tokenizer). The folder is written by `save_model_dir`, exactly as a stage's `final/`, so `omni
export`, `omni chat`, `omni eval` and `init_from` read it; a speech_out checkpoint's fitted tiny codec
(which the checkpoint keeps beside the weights) is written with it, as into `final/`.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from omni.align.objectives import OBJECTIVES
from omni.config import ConfigError, from_dict
from omni.model.load import WEIGHTS, load_model, save_model_dir
from omni.model.omni_model import PRECISION_DTYPE
from omni.model.speech import fitted_codec
from omni.speech.tiny_codebook import CONFIG_FILE
from omni.train.checkpoint import read_state
from omni.train.config import StageConfig
from omni.train.engines import retie
from omni.train.lora import apply_lora, merge
from omni.train.qlora import dequantized_state, quantize_base
from omni.train.trainer import init_model

log = logging.getLogger(__name__)


def consolidate(ckpt: str | Path, out: str | Path) -> Path:
    """Write the weights of checkpoint folder `ckpt` (checkpoints/step-N) as a model folder `out`."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and any(out.iterdir()):  # the write replaces the folder: never a run's own
        raise ConfigError(f"--out {out}: exists and is not empty; name a new folder (or remove it first)")
    state = read_state(ckpt)
    cfg = from_dict(StageConfig, state["config"], where=f"{ckpt} stage config")
    engine = state["engine"]
    objective = OBJECTIVES[cfg.method](cfg)
    if cfg.lora.enabled:
        return _merged_lora(cfg, objective, ckpt, engine, out)
    if engine == "ddp":
        model, tokenizer = load_model(ckpt, weights=False)
        module = _with_codec(objective.wrap(model), ckpt)
        module.load_weights(ckpt)  # a wrapper's own files too (the reward head)
        return save_model_dir(module, tokenizer, out)
    module, tokenizer = _skeleton(cfg, objective, ckpt)
    return save_model_dir(module, tokenizer, out, _checked(ckpt, module, _read_sharded(ckpt, module, engine)))


def _with_codec(module: torch.nn.Module, ckpt: Path) -> torch.nn.Module:
    """A talker's fitted codec from the checkpoint (every engine's keeps it, omni/train/checkpoint.py)
    onto the module, so the folder written has it as a stage's final/ does: the talker speaks only
    with the codebooks it learned."""
    if getattr(module, "talker", None) is None:
        return module
    module.codec = fitted_codec(ckpt)
    if module.codec is None and module.config.talker.codec == "tiny":
        log.warning("%s has a talker but no fitted codec (%s): the consolidated model cannot speak until the "
                    "stage's tiny_codec.json and tiny_codec.safetensors are copied into it", ckpt, CONFIG_FILE)
    return module


def _merged_lora(cfg: StageConfig, objective, ckpt: Path, engine: str, out: Path) -> Path:
    """A LoRA stage's checkpoint (adapter names beside the base weights) as the merged model, as the
    stage's `final/` would be; a QLoRA checkpoint's 4-bit base (not written) is quantised again from
    the stage's init_from and dequantised, as the run computed with it."""
    module, tokenizer = _skeleton(cfg, objective, ckpt)
    apply_lora(module, cfg.lora)
    full = dict(load_file(ckpt / WEIGHTS)) if engine == "ddp" else _read_sharded(ckpt, module, engine)
    if cfg.lora.qlora:
        base, _ = init_model(cfg)
        quantize_base(base, PRECISION_DTYPE[cfg.precision])
        apply_lora(base, cfg.lora)
        full.update(dequantized_state(base, {}))
    merged = merge(module, _checked(ckpt, module, full))
    return save_model_dir(module, tokenizer, out, merged)


def _skeleton(cfg: StageConfig, objective, ckpt: Path):
    """The trained module (the objective's wrapper included, with a talker's fitted codec) on the meta
    device, and the tokenizer."""
    try:
        model, tokenizer = init_model(cfg, skeleton=True)
    except FileNotFoundError as e:
        raise ConfigError(f"{ckpt}: its model is rebuilt from the stage's init_from {cfg.init_from}, which is "
                          f"gone ({e}); pass init_from=... pointing at that model folder again") from None
    with torch.device("meta"):
        return _with_codec(objective.wrap(model), ckpt), tokenizer


def _read_sharded(ckpt: Path, module: torch.nn.Module, engine: str) -> dict:
    """The full weights of an fsdp2 or DeepSpeed checkpoint, read into `module`'s names."""
    if engine == "fsdp2":
        return _read_dcp(ckpt / "dcp", module)
    if engine.startswith("deepspeed"):
        return _read_zero(ckpt, module)
    raise ConfigError(f"{ckpt}: written by engine {engine!r}, which omni consolidate does not know")


def _read_dcp(folder: Path, module: torch.nn.Module) -> dict:
    """The model half of an fsdp2 checkpoint ({"model", "optimizer"}, each rank's shards) as full
    CPU tensors: torch.distributed.checkpoint reads into the state dict it is given, here empty
    full-size tensors, gathering the shards from every rank's file; the optimizer is not read."""
    import torch.distributed.checkpoint as dcp

    if not folder.is_dir():
        raise ConfigError(f"{folder.parent}: written by fsdp2 but has no dcp/ folder; the checkpoint is incomplete")
    saved = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
             if k.startswith("model.")}
    empty: dict[int, torch.Tensor] = {}  # one tensor per parameter: tied names share it, as saved once
    model = {k: empty.setdefault(id(v), torch.empty(v.shape, dtype=v.dtype))
             for k, v in module.state_dict(keep_vars=True).items()}
    with warnings.catch_warnings():  # torch says it loads in one process: what this is for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": {k: v for k, v in model.items() if k in saved}}, checkpoint_id=str(folder), no_dist=True)
    return model


def _read_zero(ckpt: Path, module: torch.nn.Module) -> dict:
    """A DeepSpeed checkpoint's fp32 weights, by DeepSpeed's zero_to_fp32: the optimizer's
    partitions of every rank joined, frozen parameters and buffers from the model states."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (ckpt / "deepspeed").is_dir():
        raise ConfigError(f"{ckpt}: written by deepspeed but has no deepspeed/ folder; the checkpoint is incomplete")
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed"))


def _checked(ckpt: Path, module: torch.nn.Module, full: dict) -> dict:
    """`full` as the module's own state dict (tied parameters sharing one tensor), or an error
    naming what does not fit the model the stage config builds."""
    full = retie(module, full)
    expected = module.state_dict()
    missing = [k for k in expected if k not in full]
    unexpected = [k for k in full if k not in expected]
    wrong = [k for k in expected if k in full and full[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"{ckpt}: weights do not fit the model of its stage config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, other shape {wrong[:3]}")
    return {k: full[k] for k in expected}

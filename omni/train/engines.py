"""Training engines, chosen by a stage's `engine:`; each is the library's own API, nothing home-made.

- `ddp`: torch `DistributedDataParallel` (`find_unused_parameters`: a batch without some modality
  leaves its modules unused); in one process the bare model.
- `fsdp2`: `torch.distributed.fsdp.fully_shard` over a 1-D mesh of all ranks. Units: every LLM
  decoder layer (the classes transformers lists in `_no_split_modules`), every tower block
  (open_clip/timm/whisper) and each tower, then the root (embeddings, final norm, LM head,
  projectors). FSDP2 shards each parameter on its own (DTensor), so a unit may mix frozen and
  trainable parameters; only those with gradients are reduced and optimised. bf16: the LLM
  layers and the root gather bf16 copies (`MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`), the towers keep their parameters' dtype; autocast as for ddp; the fp32
  shards are the master weights. Under bf16, ddp and fsdp2 hold frozen parameters in bf16 (not
  the fp32 norms of whisper and open_clip): autocast computes with bf16 copies of them anyway. Under torchrun only rank 0 builds (or reads) the weights; the other ranks
  build the architecture on the meta device and receive their shards from rank 0 (torch's
  `set_model_state_dict(broadcast_from_rank0)`), so a node holds one host copy of the model, not
  one per GPU. Checkpoints: sharded, through `torch.distributed.checkpoint`; the final model is
  gathered on rank 0.
- `deepspeed`: `deepspeed.initialize` with a ZeRO config generated from the stage
  (`deepspeed_config`), stage 2 or 3. The optimizer is omni's AdamW (one group per learning
  rate glob, frozen parameters left out), handed to DeepSpeed as a client optimizer, so every
  engine runs the same update rule. bf16: DeepSpeed's `torch_autocast` (fp32 parameters, bf16
  compute and bf16 gradient communication), the same numerics as ddp and fsdp2 rather than
  DeepSpeed's bf16 mode, which would store frozen towers in bf16. ZeRO-3 under torchrun builds
  like fsdp2: only rank 0 builds the weights, the others a meta-device skeleton; each module's
  parameters are then made real one module at a time and partitioned by `deepspeed.zero.Init`
  (which broadcasts them from rank 0), so no rank other than 0 ever holds more than one module
  in full. Checkpoints: DeepSpeed's own `save_checkpoint`/`load_checkpoint` (one optimizer shard
  per rank).

Every engine's checkpoint becomes a normal model folder with `omni consolidate`
(omni/train/consolidate.py).

Common to all: the trainer weighs the loss by the step's label tokens, so gradients are summed
correctly whatever the engine averages; gradients are synchronised on the last micro-batch of a
step only; clipping to `optim.grad_clip`; the learning-rate schedule is omni's LambdaLR, stepped
once per optimizer step and saved in the trainer state.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from omni.distributed import World
from omni.modalities import MODALITIES
from omni.train.flops import TOWER_BLOCKS
from omni.train.optim import build_optimizer, build_scheduler
from omni.train.qlora import quantized_keys, without_base

log = logging.getLogger(__name__)
ZERO_STAGES = (2, 3)  # the deepspeed ZeRO stages a stage's `zero_stage` may name


class Engine:
    """`ddp`. Subclasses override what their library does differently. `cfg`: the stage's config
    (omni/train/config.py StageConfig, which reads the names here)."""
    name = "ddp"
    shards_modules = False  # weights gathered / gradients reduced per module: all ranks must run the same ones
    elastic = True  # a checkpoint resumes on another number of processes (ddp: full state; fsdp2: DCP reshards)
    # the memory layouts `omni plan` knows this engine by: name -> (weights, gradients, optimizer
    # state) sharded over the ranks (omni/plan.py)
    layouts = {"ddp": (False, False, False)}

    @classmethod
    def layout(cls, cfg) -> str:
        """The layout (a key of `layouts`) a stage runs this engine in."""
        return cls.name

    @property
    def weights_from_rank0(self) -> bool:
        """Only rank 0 builds the weights (others a meta-device skeleton); `setup` shards and
        sends them, so N ranks on a node hold one host copy of the model, not N."""
        return False

    def __init__(self, cfg, world: World):
        self.cfg, self.world = cfg, world
        self.model: nn.Module | None = None      # the OmniModel (sharded in place by fsdp2)
        self.module: nn.Module | None = None     # what the trainer calls: wrapper or the model itself
        self.optimizer = self.scheduler = None

    @property
    def description(self) -> str:
        return self.name

    # ---- set-up ----------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        self.hold_frozen_in_bf16(model)
        model.to(self.world.device)
        self.model = model
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        else:
            self.module = model
        self.optimizer = build_optimizer(model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.steps)

    def hold_frozen_in_bf16(self, model: nn.Module) -> None:
        """Under `precision: bf16`, frozen parameters are held in bf16 (omni.model.generate.hold_frozen_in):
        autocast computes with bf16 copies of them anyway. ddp and fsdp2; DeepSpeed keeps them fp32
        (ZeRO's flat partitions and its autocast assume fp32 parameters; docs/decisions.md)."""
        if self.cfg.precision == "bf16":
            from omni.model.generate import hold_frozen_in

            log.info("bf16: %.1fM frozen parameters held in bf16", hold_frozen_in(model, torch.bfloat16) / 1e6)

    # ---- one step --------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def micro_batch(self, last: bool):
        """Context around one micro-batch's forward and backward: gradients sync on the last one."""
        if last or self.world.size == 1:
            return nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @property
    def inference_module(self) -> nn.Module:
        """What held-out scoring calls: the bare model (no DDP gradient bookkeeping)."""
        return self.model

    def modalities_to_run(self, in_step: set[str]) -> set[str]:
        """Modalities every micro-batch of this step runs, on a blank input where it has none
        (`OmniModel.embed`): for engines that shard per module, those any rank's step has."""
        return set(in_step) if self.shards_modules else set()

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self._trainable(), self.cfg.optim.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def train(self) -> None:
        self.module.train()

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, folder: Path, tokenizer) -> dict:
        """Write this engine's share of a resumable checkpoint into `folder` (every rank calls it);
        returns what rank 0 adds to the trainer state."""
        if self.world.main:  # a QLoRA base is rebuilt from init_from on resume, not written
            self.model.save_pretrained(folder, tokenizer, without_base(self.model))
        return {"optimizer": self.optimizer.state_dict()}

    def load(self, folder: Path, state: dict) -> None:
        base = quantized_keys(self.model)
        if base:  # a QLoRA stage: its 4-bit base is the one this run quantised from init_from
            self.model.load_weights(folder, absent=base)
        else:  # OmniModel, or an objective's wrapper with files of its own (reward head)
            self.model.load_weights(folder)
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict | None:
        """The full weights on rank 0 for the final model, where the module holds only a shard
        (a collective: every rank calls it); None: the module's own state dict is complete."""
        return None


class FSDP2Engine(Engine):
    name = "fsdp2"
    shards_modules = True
    layouts = {"fsdp2": (True, True, True)}

    @property
    def weights_from_rank0(self) -> bool:
        return self.world.size > 1

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.world.device.type, (self.world.size,))
        fp32 = MixedPrecisionPolicy()
        llm = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.cfg.precision == "bf16" else fp32
        self.hold_frozen_in_bf16(model)
        full = model.state_dict() if self.weights_from_rank0 and self.world.main else None  # before sharding
        layers, towers = fsdp_units(omni_model(model))
        for unit in layers:  # fully_shard moves each shard to the mesh's device
            fully_shard(unit, mesh=mesh, mp_policy=llm)
        for unit in towers:  # blocks before their tower: children are sharded first
            fully_shard(unit, mesh=mesh, mp_policy=fp32)
        fully_shard(model, mesh=mesh, mp_policy=llm)
        if self.weights_from_rank0:
            self._weights_from_rank0(model, full)
        log.info("fsdp2: %d LLM layers, %d tower units + root over %d rank(s)", len(layers), len(towers),
                 self.world.size)
        self.model = self.module = model
        self.optimizer = build_optimizer(model, self.cfg.optim)  # over the DTensor shards
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.steps)

    def _weights_from_rank0(self, model: nn.Module, full: dict | None) -> None:
        """Fill the other ranks' meta-device shards from rank 0's full weights (torch's
        `set_model_state_dict(broadcast_from_rank0)`: one tensor at a time, each rank keeps its
        shard), then copy every buffer (`broadcast_buffers`)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        if not self.world.main:
            model.to_empty(device=self.world.device)
        set_model_state_dict(model, full if self.world.main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        broadcast_buffers(model)  # fully_shard and to_empty put them on the mesh's device
        log.info("fsdp2: weights built on rank 0 only, sharded to %d rank(s)", self.world.size)

    @contextmanager
    def micro_batch(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        yield

    def save(self, folder: Path, tokenizer) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder / "dcp"))
        return {}

    def load(self, folder: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        loaded = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(loaded, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return retie(self.model, full) if self.world.main else None


def broadcast_buffers(model: nn.Module) -> None:
    """Every buffer from rank 0: the non-persistent ones (e.g. rotary frequencies) are in no state
    dict, and a meta skeleton made real holds uninitialised memory."""
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def omni_model(module: nn.Module) -> nn.Module:
    """The OmniModel an objective trains: the module itself or the one it wraps (the reward model)."""
    from omni.model.omni_model import OmniModel

    return next(m for m in module.modules() if isinstance(m, OmniModel))


def fsdp_units(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """FSDP2 units below the root: the LLM's decoder layers (the classes transformers lists in
    `_no_split_modules`), and the towers' blocks followed by the towers themselves (their stems
    and final norms). Towers are not gathered in bf16 under bf16 training: whisper's LayerNorm
    computes in fp32 with the layer's own weight, so a bf16 weight would not do (frozen tower
    weights other than those norms are held in bf16: `Engine.hold_frozen_in_bf16`)."""
    classes = set(getattr(model.llm, "_no_split_modules", None) or [])
    layers = [m for m in model.llm.modules() if type(m).__name__ in classes]
    if not layers:
        raise RuntimeError(f"fsdp2: found no decoder layer of {type(model.llm).__name__} (its _no_split_modules: "
                           f"{sorted(classes)}) to shard")
    blocks = [m for m in model.encoders.modules() if type(m).__name__ in TOWER_BLOCKS]
    return layers, blocks + list(model.encoders.values())


def retie(model: nn.Module, full: dict) -> dict:
    """Gathered weights as a module's own state dict would hold them: each tensor owning its
    storage (gathering may leave views into a larger buffer, which safetensors refuses), and
    tied parameters (e.g. tied embeddings) sharing one tensor again, so the file drops the
    duplicates exactly as for an unsharded model."""
    for k, v in full.items():
        if v.untyped_storage().nbytes() != v.numel() * v.element_size():
            full[k] = v.clone()
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        for alias in group[1:]:
            if alias in full and group[0] in full:
                full[alias] = full[group[0]]
    return full


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    shards_modules = True  # ZeRO-3 gathers per module; ZeRO-2 reduces gradient buckets per micro-batch
    layouts = {f"zero{z}": (z == 3, True, True) for z in ZERO_STAGES}  # ZeRO-2: gradients + optimizer
    elastic = False  # one optimizer partition per rank, laid out for that world size

    @classmethod
    def layout(cls, cfg) -> str:
        return f"zero{cfg.zero_stage}"

    @property
    def description(self) -> str:
        return f"deepspeed-zero{self.cfg.zero_stage}"

    @property
    def weights_from_rank0(self) -> bool:
        return self.cfg.zero_stage == 3 and self.world.size > 1

    def setup(self, model: nn.Module) -> None:
        import deepspeed  # imported here: it probes the accelerator at import, which costs seconds
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it; a single process has no launcher
        config = deepspeed_config(self.cfg, self.world.size)
        # before partitioning: the groups (weight decay by parameter rank) see the full shapes
        optimizer = build_optimizer(model, self.cfg.optim)
        if self.weights_from_rank0:
            self._partition_from_rank0(model, config)
        model.to(self.world.device)  # buffers; a partitioned parameter moves no data
        if self.weights_from_rank0:
            broadcast_buffers(model)
        # a modality absent from a whole step has no gradient; ZeRO's flat partitions cannot say "none"
        # (ZeRO-2 steps on zeros, ZeRO-3 was measured to reuse the previous step's), so its trainable
        # modules always run, on a blank input if need be: a zero gradient on every engine stage
        omni = omni_model(model)
        self.trainable_modalities = {m for m in MODALITIES if any(
            p.requires_grad for p in [*omni.projectors[m].parameters(),
                                      *omni.encoders["audio" if m == "audio" else "image"].parameters()])}
        self.module, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.model, self.optimizer = model, optimizer
        # DeepSpeed partitions the client optimizer's param groups in place; the schedule sets their lr
        self.scheduler = build_scheduler(optimizer, self.cfg.optim, self.cfg.steps)

    def _partition_from_rank0(self, model: nn.Module, config: dict) -> None:
        """ZeRO-3 partitions from rank 0's weights, one module at a time, children first: on the other
        ranks the module's own meta parameters become real (the same Parameter objects, which the
        optimizer already holds) and `deepspeed.zero.Init(module=...)` broadcasts them from rank 0
        and keeps this rank's partition; converted parameters (shared ones, children's) are skipped."""
        import deepspeed

        deepspeed.init_distributed()  # over the trainer's process group, which it finds already made
        for module in reversed(list(model.modules())):  # pre-order reversed: descendants first
            own = [p for p in module.parameters(recurse=False) if not hasattr(p, "ds_id")]
            if not self.world.main:
                for p in own:
                    if p.is_meta:
                        torch.utils.swap_tensors(p, nn.Parameter(torch.empty(p.shape, dtype=p.dtype,
                                                                              device=self.world.device),
                                                                  requires_grad=p.requires_grad))
                for name, b in module.named_buffers(recurse=False):
                    if b.is_meta:
                        module._buffers[name] = torch.empty_like(b, device=self.world.device)
            if own:
                deepspeed.zero.Init(module=module, config_dict_or_path=config)
        log.info("deepspeed: weights built on rank 0 only, partitioned over %d rank(s)", self.world.size)

    def modalities_to_run(self, in_step: set[str]) -> set[str]:
        return set(in_step) | self.trainable_modalities

    @property
    def inference_module(self) -> nn.Module:
        return self.module  # DeepSpeed's engine: it gathers ZeRO-3 weights and autocasts

    def autocast(self):
        return nullcontext()  # DeepSpeed's torch_autocast wraps its forward (deepspeed_config)

    def micro_batch(self, last: bool):
        return nullcontext()  # ZeRO-2/3 reduce every micro-batch; the step waits for the boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)  # the loss is already weighed by the step's tokens
        self.module.step()  # a no-op before the last micro-batch of the step

    def step(self) -> float:
        if not self.module.was_step_applied() and self.world.main:
            log.warning("deepspeed skipped an optimizer step")
        self.scheduler.step()
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path, tokenizer) -> dict:
        self.module.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)
        return {}

    def load(self, folder: Path, state: dict) -> None:
        path, _ = self.module.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint under tag 'deepspeed'")

    def full_state_dict(self) -> dict | None:
        if self.cfg.zero_stage < 3:  # ZeRO-2 keeps the full fp32 weights in the module, as views of its flat buffer
            if not self.world.main:
                return None
            return retie(self.model, {k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        import deepspeed

        gathered: dict[int, torch.Tensor] = {}
        for module in self.model.modules():  # one module at a time, not the whole model at once
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.world.main:
                    for p in params:
                        gathered.setdefault(id(p), p.detach().cpu().clone())
        if not self.world.main:
            return None
        by_name = {name: gathered[id(p)] for name, p in self.model.named_parameters(remove_duplicate=False)}
        return {k: by_name.get(k, v) for k, v in self.model.state_dict().items()}  # buffers are not partitioned


ENGINES = {e.name: e for e in (Engine, FSDP2Engine, DeepSpeedEngine)}  # a stage's `engine:`
LAYOUTS = {name: sharded for e in ENGINES.values() for name, sharded in e.layouts.items()}


def stage_layout(cfg) -> str:
    """The memory layout of the stage's own engine (deepspeed: zero2 / zero3)."""
    return ENGINES[cfg.engine].layout(cfg)


def build_engine(cfg, world: World) -> Engine:
    return ENGINES[cfg.engine](cfg, world)


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON config of a stage (written to OUT/deepspeed_config.json for reference)."""
    micro, accum = cfg.batch.micro_batch, cfg.batch.grad_accum
    zero = {"stage": cfg.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if cfg.zero_stage == 3:  # omni gathers the final weights itself, in fp32 (full_state_dict)
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # omni's torch AdamW, passed as the client optimizer
        "steps_per_print": 2 ** 31 - 1,           # omni logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def write_engine_config(engine: Engine, out_dir: Path) -> None:
    if isinstance(engine, DeepSpeedEngine):
        (out_dir / "deepspeed_config.json").write_text(json.dumps(deepspeed_config(engine.cfg, engine.world.size),
                                                                  indent=2))

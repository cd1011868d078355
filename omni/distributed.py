"""Process group set-up for `torchrun` launches (and DeepSpeed's `deepspeed` launcher).

`torchrun --nproc_per_node N -m omni.cli train STAGE.yaml ...` sets RANK/WORLD_SIZE/LOCAL_RANK;
we join the group (NCCL on GPUs, gloo on CPU) and offer the few collectives the trainer needs.
Wrapping the model is the engine's job (omni/train/engines.py). In a single process nothing is
joined, unless the engine needs a process group anyway (FSDP2 and DeepSpeed shard over a device
mesh even of size 1): then a one-member group over an in-memory store.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False            # we initialised the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @classmethod
    def from_env(cls, need_group: bool = False) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        world = cls(rank=rank, size=size, device=device)
        if (size > 1 or need_group) and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            if size > 1:
                dist.init_process_group(world.backend)
            else:
                dist.init_process_group(world.backend, store=dist.HashStore(), rank=0, world_size=1)
            world.owns_group = True
        return world

    def sum(self, value: float) -> float:
        return self.sum_all([value])[0]

    def sum_all(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in one collective."""
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value) -> list:
        if self.size == 1:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

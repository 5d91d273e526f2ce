"""This process's place under `torchrun`: rank, world size, and the few collectives stages need.

Without torchrun (no `WORLD_SIZE`, or 1) everything here is a no-op, so stages run the same code alone.
The process group uses NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    host_group: Any = field(default=None, compare=False, repr=False)
    """A gloo group over the same ranks for host-side flags; None where the default group is gloo."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one. Over gloo on the host, so that asking
        (every training step) never waits for the GPU as reading back an NCCL result would."""
        if self.world == 1:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())


# `Ranks.host_group` where the default group is NCCL, made by the first `start` that needs it.
_host_group = None


def start(device: torch.device) -> Ranks:
    """Join the torchrun process group if there is one (NCCL for CUDA devices, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    global _host_group
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if _host_group is None and dist.get_backend() != "gloo":  # made once: every rank must join its making
        _host_group = dist.new_group(backend="gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), _host_group)


def rank_device(spec_device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per local rank under torchrun when the config asks for plain `cuda`."""
    if spec_device.type == "cuda" and spec_device.index is None and ranks.world > 1:
        return torch.device("cuda", ranks.local_rank)
    return spec_device

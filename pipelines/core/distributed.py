"""This process's place under `torchrun`: rank, world size, its device, and the few collectives stages need.

Without torchrun (no `WORLD_SIZE`, or 1) everything here is a no-op, so stages run the same code alone.
The process group uses NCCL on CUDA and gloo on CPU. On CUDA each process takes the GPU of its local rank
before the group is made (`torch.cuda.set_device` and `device_id=`, as torchtitan does): NCCL puts a
collective's tensors on the *current* device, so without it every rank's first collective would run on
GPU 0. Host-side collectives (rank 0's decisions, barriers, stop flags) run on a gloo group with an explicit
timeout, so they never make a rank wait for its GPU nor guess a device.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from pipelines.errors import ConfigError

# How long a host-side collective waits for the other ranks: rank 0 may be writing and hashing a checkpoint
# of a billion-parameter model while the others wait at the barrier after it (NCCL's default watchdog,
# 10 minutes, would kill them for it).
HOST_TIMEOUT = timedelta(minutes=60)


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
            torch.distributed.barrier(group=self.host_group)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(values, value, group=self.host_group)
        return values

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


def start(device: torch.device, setting: str = "device") -> Ranks:
    """Join the torchrun process group if there is one (NCCL for CUDA devices, gloo otherwise), on CUDA
    after making this rank's GPU (`rank_device`) the current device. `setting` names the config key that
    chose `device`, for the error when ranks would share a GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    global _host_group
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            mine = rank_device(device, Ranks(world=world, local_rank=local_rank))
            _check_one_gpu_per_rank(device, mine, setting)
            torch.cuda.set_device(mine)
            dist.init_process_group(backend="nccl", device_id=mine)
        else:
            dist.init_process_group(backend="gloo", timeout=HOST_TIMEOUT)
    if _host_group is None and dist.get_backend() != "gloo":  # made once: every rank must join its making
        _host_group = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, _host_group)


def rank_device(spec_device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per local rank under torchrun when the config asks for plain `cuda`."""
    if spec_device.type == "cuda" and spec_device.index is None and ranks.world > 1:
        return torch.device("cuda", ranks.local_rank)
    return spec_device


def _check_one_gpu_per_rank(spec_device: torch.device, mine: torch.device, setting: str) -> None:
    """Two ranks on one GPU hang in NCCL's first collective: refuse it in one line instead."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if spec_device.index is not None and local_world > 1:
        raise ConfigError(
            f"`{setting}` is `{spec_device}` for all {local_world} ranks on this node; NCCL needs one GPU "
            f'per rank. Set `{setting}` to "cuda" or "auto" (each rank takes the GPU of its local rank).'
        )
    available = torch.cuda.device_count()
    if mine.index >= available:
        raise ConfigError(
            f"torchrun started {local_world} ranks on {socket.gethostname()}, which has {available} GPU(s); "
            f"NCCL needs one GPU per rank. Pass `--nproc_per_node {available}` or fewer."
        )


def layout_lines(ranks: Ranks, device: torch.device) -> list[str] | None:
    """One line per node naming its devices (a collective: every rank calls it); rank 0 gets the lines,
    the others None."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    seen = ranks.gather((socket.gethostname(), ranks.rank, str(device), name))
    if not ranks.main:
        return None
    nodes: dict[str, list[tuple[int, str, str]]] = {}
    for host, rank, where, what in seen:
        nodes.setdefault(host, []).append((rank, where, what))
    lines = []
    for host, members in nodes.items():
        devices = ", ".join(f"rank {rank} on {where}" for rank, where, _ in members)
        kinds = sorted({what for _, _, what in members})
        lines.append(f"{host}: {len(members)} rank(s) ({', '.join(kinds)}): {devices}")
    return lines

"""How the student runs on several ranks: DDP or FSDP (and `torch.compile`) applied to a finished model by
one function, and the full (unsharded) model and optimizer states that checkpoints hold either way.

Alone (one rank) nothing is wrapped; the states are the plain `state_dict`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.core.distributed import Ranks


@dataclass(frozen=True)
class Parallelism:
    ranks: Ranks
    device: torch.device
    fsdp: bool = False
    compile: bool = False

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.ranks.world > 1

    def apply(self, model: torch.nn.Module, loss: torch.nn.Module) -> torch.nn.Module:
        """`loss`, a module whose forward runs `model` (which it holds), ready to train on these ranks:
        `model` sharded by FSDP per block and at its root, or `loss` wrapped by DDP; compiled if asked,
        so that the loss compiles with the model. `loss` itself stays usable as it is (for evaluation).

        Build the optimizer after this: FSDP replaces the parameters with sharded ones, which it must hold.
        """
        wrapped = loss
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for block in model.h:
                fully_shard(block)
            fully_shard(model)
        elif self.ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Concepts predicted but not mixed in (`mixing = "none"`) leave the compression without a
            # gradient, which DDP must be told about.
            unused = getattr(getattr(model, "config", None), "mixing", "") == "none"
            wrapped = DistributedDataParallel(loss, device_ids=ids, find_unused_parameters=unused)
        if self.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full model state on every rank (gathered to CPU when sharded)."""
        if not self.sharded:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)

    def load(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
    ) -> None:
        """Load full states (as `model_state` and `optimizer_state` give them) into the wrapped model."""
        if not self.sharded:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

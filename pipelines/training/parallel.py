"""How the student runs on several ranks: DDP or FSDP (and `torch.compile`) applied to a finished model by
one function, and the full (unsharded) model and optimizer states that checkpoints hold either way.

Alone (one rank) nothing is wrapped; the states are the plain `state_dict`s.

Compilation uses static shapes (`dynamic=False`): every training forward of a run has the same batch shape,
and a CoCoMix student's blocks see two lengths (T before the insert layer, 2T after), which would otherwise
make Dynamo recompile them with a symbolic length. Each `apply` starts from a reset Dynamo, so a process that
trains several students (`cocomix run`) compiles each as if alone, and hitting the recompile limit is an
error rather than a silent fall back to eager.

Under FSDP, Dynamo cannot trace FSDP's hooks: a compiled loss around sharded blocks breaks its graph inside
the loop over the blocks, and Dynamo then runs that whole frame eagerly (embeddings, mixing, the head and
the loss uncompiled). So, as torchtitan does, each block is compiled before it is sharded, the loop that
calls them stays eager, and the code around the blocks is compiled piece by piece: the embedding, the
concept mixing, and the head with the loss in one graph. The root FSDP unit is the loss module (it holds the
student), so that the head and the loss run inside its forward, where the root's parameters are gathered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.core.distributed import Ranks

# What `torch.compile` is given for the student: one static shape per call site (see the module doc).
COMPILE_OPTIONS = {"dynamic": False}


@dataclass(frozen=True)
class Parallelism:
    ranks: Ranks
    device: torch.device
    fsdp: bool = False
    compile: bool = False
    compute_dtype: torch.dtype | None = None
    """The autocast dtype of the forward (None: float32); on CUDA, FSDP gathers parameters in it."""

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.ranks.world > 1

    def apply(self, model: torch.nn.Module, loss: torch.nn.Module) -> torch.nn.Module:
        """`loss`, a module whose forward runs `model` (which it holds), ready to train on these ranks:
        `model`'s blocks and then `loss` sharded by FSDP, or `loss` wrapped by DDP; compiled if asked.
        The module returned is the one to train; `loss` itself serves evaluation (under FSDP it is that
        module, run with compilation off).

        Build the optimizer after this: FSDP replaces the parameters with sharded ones, which it must hold.
        """
        if self.compile:
            _start_compiling()
        if self.sharded:
            return self._shard(model, loss)
        wrapped = loss
        if self.ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Concepts predicted but not mixed in (`mixing = "none"`) leave the compression without a
            # gradient, which DDP must be told about.
            unused = getattr(getattr(model, "config", None), "mixing", "") == "none"
            wrapped = DistributedDataParallel(loss, device_ids=ids, find_unused_parameters=unused)
        if self.compile:
            wrapped = torch.compile(wrapped, **COMPILE_OPTIONS)
        return wrapped

    def _shard(self, model: torch.nn.Module, loss: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if self.device.type == "cuda" and self.compute_dtype is not None:
            # Gather and compute in bf16 (half the all-gather bytes), reduce gradients in float32.
            policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        if self.compile:
            for index, block in enumerate(model.h):
                model.h[index] = torch.compile(block, fullgraph=True, **COMPILE_OPTIONS)
        for block in model.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(loss, mp_policy=policy)
        if self.compile:
            _compile_around_blocks(model, loss)
        return loss

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

    def gradient_sync(self, wrapped: torch.nn.Module, last_micro_step: bool):
        """A context for one micro-step's backward that reduces gradients across ranks only on the last
        micro-step of an optimizer step: DDP's `no_sync`, FSDP2's `set_requires_gradient_sync` (FSDP2 has no
        `no_sync`; without it every micro-step would reduce-scatter)."""
        if self.ranks.world == 1 or last_micro_step:
            if self.sharded:
                wrapped.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.sharded:
            wrapped.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        inner = getattr(wrapped, "_orig_mod", wrapped)  # DDP under torch.compile
        return inner.no_sync()


def _start_compiling() -> None:
    """A fresh Dynamo for this student (see the module doc)."""
    torch._dynamo.reset()
    # A recompile-limit hit otherwise logs one warning and trains on eagerly, several times slower.
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def _compile_around_blocks(model: torch.nn.Module, loss: torch.nn.Module) -> None:
    """Compile what runs around the (already compiled, sharded) blocks, piece by piece: bound methods
    replaced on the instances, so that the loop in `GPT.trunk` stays eager and calls the compiled pieces."""
    model.embed = torch.compile(model.embed, **COMPILE_OPTIONS)
    model.mix = torch.compile(model.mix, **COMPILE_OPTIONS)
    loss.head_and_loss = torch.compile(loss.head_and_loss, **COMPILE_OPTIONS)

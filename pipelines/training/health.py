"""Non-finite losses and gradient norms, watched on the device and read back only where the loop syncs.

Checking every step would make the host wait for the GPU at every step. Instead each step records, on the
device, the first step whose loss or gradient norm is not finite, and `first_problem` reads that record where
the trainer reads values back anyway (log steps, evaluations, checkpoints, the end). Weights trained past that
step are never saved, because every checkpoint is preceded by a check, and the error names the step.
"""

from __future__ import annotations

import math

import torch

from pipelines.core.distributed import Ranks


class NonFiniteWatch:
    def __init__(self, device: torch.device):
        # (first bad step, its loss, its gradient norm); the step is inf while every step was finite.
        self.record = torch.full((3,), math.inf, dtype=torch.float64, device=device)

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record step `step` (1-based) if it is the first with a non-finite loss or gradient norm."""
        at = torch.full((), float(step), dtype=torch.float64, device=self.record.device)  # no host copy
        current = torch.stack([at, loss.detach().double(), grad_norm.detach().double()])
        first = self.record[0].isinf() & ~current[1:].isfinite().all()
        self.record = torch.where(first, current, self.record)

    def first_problem(self, ranks: Ranks) -> tuple[int, str] | None:
        """(step, what was not finite) of the earliest non-finite step on any rank, or None."""
        step, loss, grad_norm = self.record.tolist()
        earliest = step
        if ranks.world > 1:  # every rank must agree on when to stop
            shared = self.record[:1].clone()
            torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MIN)
            earliest = shared.item()
        if math.isinf(earliest):
            return None
        if step != earliest:
            return int(earliest), "the loss or the gradient norm on another rank is not finite"
        if not math.isfinite(loss):
            return int(earliest), f"the loss is {loss}"
        return int(earliest), f"the gradient norm is {grad_norm}"

"""Training batches from the cached stores: a pure function of (seed, step), read ahead of the model.

Epoch e visits every train block once in the order of a permutation seeded by (seed, e); the global batch
of step s is the next `global_batch` positions of that endless stream. Micro-step a of rank r takes the
slice `[(a * world + r) * b, ... + b)`, so one process with batch 2b and two ranks with batch b see the same
blocks, and a resumed run needs only the step. A background thread reads the next step while the current
one trains.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

# Arrays read into memory at start when together they are smaller than this; random row reads otherwise.
IN_MEMORY_BYTES = 1 << 30


@dataclass(frozen=True)
class BatchOrder:
    n_blocks: int
    seed: int
    global_batch: int

    def rows(self, step: int) -> np.ndarray:
        """Train block indices of step `step`'s global batch, in order."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, offsets = np.divmod(positions, self.n_blocks)
        out = np.empty(self.global_batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_blocks)
            mask = epochs == epoch
            out[mask] = order[offsets[mask]]
        return out


class SplitArrays:
    """Named arrays sharing a first (block) axis: tokens and whatever per-token targets an objective reads.

    Held in memory when small, read row by row from Zarr otherwise.
    """

    def __init__(self, arrays: dict[str, Any]):
        total = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())
        self.in_memory = total <= IN_MEMORY_BYTES
        self.arrays = {name: a[:] if self.in_memory else a for name, a in arrays.items()}
        self.n_blocks = next(iter(arrays.values())).shape[0]

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self.in_memory:
            return {name: a[rows] for name, a in self.arrays.items()}
        unique, inverse = np.unique(rows, return_inverse=True)
        return {name: a.oindex[unique][inverse] for name, a in self.arrays.items()}


class BatchReader:
    """This rank's micro-batches of each step, read one step ahead in a background thread, where
    `convert` (if given) also turns each micro-batch into what the trainer takes (e.g. pinned tensors)."""

    def __init__(
        self,
        split: SplitArrays,
        order: BatchOrder,
        per_rank: int,
        accum: int,
        rank: int,
        world: int,
        convert: Callable[[dict[str, np.ndarray]], Any] | None = None,
    ):
        self.split, self.order = split, order
        self.per_rank, self.accum, self.rank, self.world = per_rank, accum, rank, world
        self.convert = convert or (lambda batch: batch)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._ahead: tuple[int, Future] | None = None

    def _read_step(self, step: int) -> list[Any]:
        rows = self.order.rows(step)
        micro = []
        for a in range(self.accum):
            start = (a * self.world + self.rank) * self.per_rank
            micro.append(self.convert(self.split.read(rows[start : start + self.per_rank])))
        return micro

    def step(self, step: int) -> list[Any]:
        """The `accum` micro-batches of `step` for this rank; starts reading `step + 1`."""
        if self._ahead is not None and self._ahead[0] == step:
            batches = self._ahead[1].result()
        else:
            batches = self._read_step(step)
        self._ahead = (step + 1, self._pool.submit(self._read_step, step + 1))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

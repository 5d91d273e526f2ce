"""Training speed that means what it says: tokens per second over windows of training steps only.

A window runs from one logged row to the next. Evaluation and checkpoints inside it are paused out (after
waiting for the GPU, so that the training kernels queued before them count as training), and a window that
holds compilation (the first after a start with `pretrain.compile`) is marked warm-up. A run's speed is the
median of its steady windows, robust to the odd slow one (a busy filesystem, another job on the node).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch


class SpeedMeter:
    def __init__(self, tokens_per_step: int, device: torch.device, warmup_windows: int):
        self.tokens_per_step = tokens_per_step
        self.device = device
        self.warmup_left = warmup_windows
        self._restart()

    def _restart(self) -> None:
        self.started, self.steps, self.paused_s = time.perf_counter(), 0, 0.0

    def step(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time."""
        self._wait_for_device()
        began = time.perf_counter()
        try:
            yield
        finally:
            self._wait_for_device()
            self.paused_s += time.perf_counter() - began

    def window(self) -> tuple[float | None, bool]:
        """(tokens per second of the steps since the last window, whether it was a warm-up window); starts
        the next window. Call it after reading values back, which waits for the device."""
        elapsed = time.perf_counter() - self.started - self.paused_s
        rate = self.steps * self.tokens_per_step / elapsed if self.steps and elapsed > 0 else None
        warmup = self.warmup_left > 0
        self.warmup_left = max(0, self.warmup_left - 1)
        self._restart()
        return rate, warmup

    def _wait_for_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def steady_speed(rows: list[dict]) -> float | None:
    """The median tokens/s of the logged train rows outside warm-up windows; None when there is none."""
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and not r.get("warmup")]
    return round(statistics.median(speeds), 1) if speeds else None

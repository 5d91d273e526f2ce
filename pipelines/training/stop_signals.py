"""SIGTERM and Ctrl-C as a request to stop a training loop after its current step, so that it saves a
checkpoint and returns instead of dying between two (the loop polls `requested`).

A second Ctrl-C stops at once (KeyboardInterrupt). A repeated SIGTERM is not a second request: under slurm
every process of the step gets it from slurmstepd and again from torchrun. Signals reach the main thread
only, so elsewhere nothing is installed. `pretrain`'s and `train-sae`'s loops both stop this way.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopSignals:
    def __init__(self, what: str):
        self.what = what  # the loop, for the warning: "train-sae"
        self.requested: str | None = None  # the signal's name once one came
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
            }
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = signal.Signals(signum).name
        log.warning("%s received: %s finishes its step, then saves a checkpoint", self.requested, self.what)

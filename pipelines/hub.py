"""Calls into `datasets` / `huggingface_hub` without their logging: failures are re-raised, explained.

Offline, the hub client retries with warnings for about 20 s before failing; those warnings (and progress
bars) would bury the one-line error the caller gives instead.
"""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_hub():
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # for good: streamed reads fail later too
    datasets.disable_progress_bars()
    hub_logger = logging.getLogger("huggingface_hub")
    previous = hub_logger.level
    hub_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        hub_logger.setLevel(previous)

"""Calls into `datasets` / `huggingface_hub` without their logging, and a quick probe of the hub.

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


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the HuggingFace hub cannot be asked (DNS failure, refused, timed out), or None when it can.

    In offline mode (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`) the local datasets cache answers at once,
    without the network, so that counts as reachable: the load itself says whether the data is cached.
    """
    import os
    import socket
    from urllib.parse import urlparse

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
            return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc.strerror or exc}"

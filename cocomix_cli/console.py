"""The two consoles every command prints to: results on stdout, errors and notes on stderr; and the switch
that hides the progress bars libraries draw on their own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def library_progress_bars_hidden() -> Iterator[None]:
    """For one command under `--no-progress`: every tqdm bar drawn meanwhile is disabled, the ones libraries
    draw whatever we pass them included (transformers de-quantising a GGUF teacher, huggingface_hub's
    downloads). tqdm reads its own switch (`TQDM_DISABLE`) only when imported, so it is set here instead."""
    from tqdm import std

    draw = std.tqdm.__init__

    def hidden(self, *args, **kwargs):
        kwargs["disable"] = True
        draw(self, *args, **kwargs)

    std.tqdm.__init__ = hidden
    try:
        yield
    finally:
        std.tqdm.__init__ = draw

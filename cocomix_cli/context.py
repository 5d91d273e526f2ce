"""Global options shared by every command, and the one way commands resolve the config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from pipelines.config.loading import load_config
from pipelines.config.schema import Config

# The `ctx.meta` key of what was typed (an `interrupts.Invocation`); every command's context shares it.
INVOCATION = "cocomix.invocation"


@dataclass(frozen=True)
class GlobalOptions:
    config: Path | None
    overrides: tuple[str, ...]
    progress: bool


def resolve_config(ctx: typer.Context, flags: Mapping[str, Any] | None = None) -> Config:
    """Defaults < config file < `--set` < this command's own flags (None means the flag was not given)."""
    options: GlobalOptions = ctx.obj
    return load_config(options.config, options.overrides, flags)

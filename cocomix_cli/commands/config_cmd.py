"""`cocomix config show`: the resolved configuration as TOML."""

from __future__ import annotations

from typing import Annotated

import typer

from cocomix_cli.context import resolve_config
from pipelines.config import to_toml

app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)


@app.command("show")
def show(
    ctx: typer.Context,
    docs: Annotated[bool, typer.Option("--docs/--no-docs", help="Comment each key with its meaning.")] = True,
) -> None:
    """Print the resolved config (defaults < file < --set) as TOML that `--config` reads back."""
    typer.echo(to_toml(resolve_config(ctx), with_docs=docs), nl=False)

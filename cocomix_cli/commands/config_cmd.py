"""`cocomix config show` (the resolved configuration as TOML) and `cocomix config reference` (every key)."""

from __future__ import annotations

from typing import Annotated

import typer

from cocomix_cli.context import resolve_config
from pipelines.config.render import to_toml

app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)


@app.command("show")
def show(
    ctx: typer.Context,
    docs: Annotated[bool, typer.Option("--docs/--no-docs", help="Comment each key with its meaning.")] = True,
) -> None:
    """Print the resolved config (defaults < file < --set) as TOML that `--config` reads back."""
    typer.echo(to_toml(resolve_config(ctx), with_docs=docs), nl=False)


@app.command("reference")
def reference() -> None:
    """Print every key of every section with its default, accepted range and meaning as a Markdown page:
    docs/CONFIG.md is `cocomix config reference > docs/CONFIG.md`."""
    from pipelines.config.render import reference_markdown

    typer.echo(reference_markdown(), nl=False)

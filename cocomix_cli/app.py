"""Root of the `cocomix` CLI: global options, the command list, and how errors reach the user.

A `CocomixError` (a user mistake or unusable input) becomes one red line on stderr and exit code 2; an
interrupt exits 130 and leaves the stage resumable; anything else is a bug and keeps its traceback.
Commands import torch, transformers and zarr only when they run, so `cocomix --help` is instant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from cocomix_cli.commands import config_cmd, prepare_cmd, status_cmd
from cocomix_cli.console import err_console
from cocomix_cli.context import GlobalOptions
from pipelines import __version__
from pipelines.errors import CocomixError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class CocomixGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CocomixError as exc:
            err_console.print(f"error: {exc}", style="bold red", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: run the same command again to resume.", style="yellow", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=CocomixGroup,
    name="cocomix",
    help="CoCoMix pretraining: LLM pretraining with continuous concepts, stage by resumable stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cocomix {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="Config file (default: ./cocomix.toml when it exists)."),
    ] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override one config value, `section.key=value`; repeatable."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage is doing.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    ctx.obj = GlobalOptions(config=config, overrides=tuple(overrides or ()), progress=not no_progress)


app.command("prepare")(prepare_cmd.prepare)
app.command("status")(status_cmd.status)
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    app()

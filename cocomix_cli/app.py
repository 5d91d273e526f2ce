"""Root of the `cocomix` CLI: global options, the command list, and how errors reach the user.

A `CocomixError` (a user mistake or unusable input) becomes one red line on stderr and exit code 2; an
interrupt exits 130 and leaves the stage resumable; anything else is a bug and keeps its traceback.
Commands import torch, transformers and zarr only when they run, so `cocomix --help` is instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from cocomix_cli.commands import (
    concepts_cmd,
    config_cmd,
    eval_cmd,
    extract_cmd,
    prepare_cmd,
    pretrain_cmd,
    run_cmd,
    status_cmd,
    steer_cmd,
    train_sae_cmd,
)
from cocomix_cli.console import err_console
from cocomix_cli.context import GlobalOptions
from pipelines import __version__
from pipelines.errors import CocomixError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


GLOBAL_OPTIONS_WITH_VALUE = ("--config", "--set")
GLOBAL_FLAGS = ("--verbose", "--no-progress")


class CocomixGroup(TyperGroup):
    def parse_args(self, ctx, args):
        """Accept the global options after the command too (`cocomix prepare --set data.x=1`)."""
        hoisted, rest = [], []
        position = 0
        while position < len(args):
            arg = args[position]
            if arg == "--":
                rest += args[position:]
                break
            if arg in GLOBAL_OPTIONS_WITH_VALUE:
                hoisted += args[position : position + 2]
                position += 2
                continue
            if arg in GLOBAL_FLAGS or arg.split("=", 1)[0] in GLOBAL_OPTIONS_WITH_VALUE:
                hoisted.append(arg)
            else:
                rest.append(arg)
            position += 1
        return super().parse_args(ctx, hoisted + rest)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CocomixError as exc:
            err_console.print(
                f"error: {exc}", style="bold red", markup=False, highlight=False, soft_wrap=True
            )
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err_console.print(
                "interrupted: run the same command again to resume.", style="yellow", markup=False
            )
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
        Path | None,
        typer.Option(
            "--config", "-c", metavar="PATH", help="Config file (default: ./cocomix.toml when it exists)."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="SECTION.KEY=VALUE",
            help="Override one config value, `section.key=value`; repeatable.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage is doing.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _configure_logging(verbose)
    ctx.obj = GlobalOptions(config=config, overrides=tuple(overrides or ()), progress=not no_progress)


def _configure_logging(verbose: bool) -> None:
    """Our own loggers only: libraries keep their own handlers, so nothing is printed twice."""
    logger = logging.getLogger("pipelines")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is now, not the stream it was at the first command of the process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


app.command("run")(run_cmd.run)
app.command("prepare")(prepare_cmd.prepare)
app.command("train-sae")(train_sae_cmd.train_sae)
app.command("extract-concepts")(extract_cmd.extract_concepts)
app.command("pretrain")(pretrain_cmd.pretrain)
app.command("eval")(eval_cmd.evaluate)
app.command("steer")(steer_cmd.steer)
app.command("status")(status_cmd.status)
app.add_typer(concepts_cmd.app, name="concepts")
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    app()

"""Root of the `cocomix` CLI: global options, the command list, and how errors reach the user.

A `CocomixError` (a user mistake or unusable input) becomes one red line on stderr and exit code 2; an
interrupt (Ctrl-C, or SIGTERM) exits 130, leaves the stage resumable and names the command that resumes it;
anything else is a bug and keeps its traceback.
Commands import torch, transformers and zarr only when they run, so `cocomix --help` is instant.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from cocomix_cli.commands import (
    concepts_cmd,
    config_cmd,
    eval_cmd,
    export_cmd,
    extract_cmd,
    prepare_cmd,
    pretrain_cmd,
    run_cmd,
    status_cmd,
    steer_cmd,
    train_sae_cmd,
)
from cocomix_cli.console import err_console, library_progress_bars_hidden
from cocomix_cli.context import INVOCATION, GlobalOptions
from cocomix_cli.interrupts import (
    Invocation,
    full_disk_message,
    interrupted_message,
    sigterm_as_interrupt,
)
from pipelines import __version__
from pipelines.errors import CocomixError, OtherRankError
from pipelines.stages import workflow

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


GLOBAL_OPTIONS_WITH_VALUE = ("--config", "-c", "--set")
GLOBAL_FLAGS = ("--verbose", "-v", "--no-progress")


class CocomixGroup(TyperGroup):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _name_values_like_click(self)

    def parse_args(self, ctx, args):
        """Accept the global options after the command too (`cocomix prepare -v --set data.x=1`).

        An option that the command (or its subcommand) declares itself stays the command's, so a command
        may use a global option's letter for its own option.
        """
        hoisted, rest = [], []
        own: set[str] = set()  # option names of the commands named so far
        group: TyperGroup | None = self  # where the next word may name a (sub)command
        position = 0
        while position < len(args):
            arg = args[position]
            if arg == "--":
                rest += args[position:]
                break
            option = _global_option(arg)
            if option is not None and option not in own:
                width = 2 if arg in GLOBAL_OPTIONS_WITH_VALUE else 1  # `--set X`, not `--set=X` or `-cX`
                hoisted += args[position : position + width]
                position += width
                continue
            if group is not None and not arg.startswith("-"):
                command = group.get_command(ctx, arg)
                if command is not None:
                    own |= _option_names(command)
                    group = command if isinstance(command, TyperGroup) else None
            rest.append(arg)
            position += 1
        ctx.meta[INVOCATION] = Invocation(tuple(hoisted), tuple(rest))
        return super().parse_args(ctx, hoisted + rest)

    def invoke(self, ctx):
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except CocomixError as exc:
            if not isinstance(exc, OtherRankError):  # rank 0 says it for every rank
                _say(f"error: {exc}", "bold red")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _say(full_disk_message(ctx.meta.get(INVOCATION), exc), "bold red")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt as interrupt:
            _say(interrupted_message(ctx.meta.get(INVOCATION), interrupt), "yellow")
            raise typer.Exit(EXIT_INTERRUPTED) from None


def _say(line: str, style: str) -> None:
    """The one line on stderr that ends a command early, printed as written (no markup, no wrapping); a
    message that quotes a library's several lines (transformers' offline advice) is joined into one."""
    line = " ".join(part.strip() for part in line.splitlines() if part.strip())
    err_console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)


def _global_option(arg: str) -> str | None:
    """The global option that `arg` is or starts with (`--set=X`, `-cPATH`), or None."""
    if arg in GLOBAL_OPTIONS_WITH_VALUE or arg in GLOBAL_FLAGS:
        return arg
    name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
    return name if name in GLOBAL_OPTIONS_WITH_VALUE else None


# Click's names for values; Typer's own label is the Python type (`<str>`, `<int>`, `<bool>` on flags too).
_VALUE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH"}


def _name_values_like_click(command: TyperCommand | TyperGroup) -> None:
    """Name each option's value as Click does (TEXT, INTEGER, ..., a choice's values), a flag's not at all
    and an argument by its name (MODEL); a metavar given in the code stays."""
    for param in command.params:
        if param.metavar is not None:
            continue
        described = param.type_descriptor
        if param.param_type_name == "argument":  # named by what it is, as in the usage line
            param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx: None  # and no Python type beside that name
        elif param.is_flag:
            param.metavar = ""
        elif described.is_choice:
            param.metavar = "|".join(map(str, described.choices or ()))
        else:
            param.metavar = _VALUE_NAMES.get(param.bare_type(), param.bare_type().upper())
    make_help_option = command.get_help_option  # made when help is asked for, so named then

    def help_option(ctx):
        option = make_help_option(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _name_values_like_click(sub)


def _option_names(command: TyperCommand | TyperGroup) -> set[str]:
    # Typer builds commands with its own copy of click, so these are read by name, not by class.
    return {
        name
        for param in command.params
        for name in (*param.opts, *param.secondary_opts)
        if name.startswith("-")
    }


app = typer.Typer(
    cls=CocomixGroup,
    name="cocomix",
    help="CoCoMix pretraining: LLM pretraining with continuous concepts, stage by resumable stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
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
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide every progress bar, the libraries' included.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _configure_logging(verbose)
    ctx.obj = GlobalOptions(config=config, overrides=tuple(overrides or ()), progress=not no_progress)
    if no_progress:
        ctx.with_resource(library_progress_bars_hidden())  # until the command ends


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


# Each stage's own command, by the step it runs; the command's name is the step's declaration
# (`pipelines.core.stage_registry`).
STAGE_COMMANDS = {
    "prepare": prepare_cmd.prepare,
    "train-sae": train_sae_cmd.train_sae,
    "extract-concepts": extract_cmd.extract_concepts,
    "pretrain": pretrain_cmd.pretrain,
    "eval": eval_cmd.evaluate,
    "steer": steer_cmd.steer,
}

app.command("run")(run_cmd.run)
for _stage in workflow.stage_specs():
    if _stage.command is not None:
        app.command(_stage.command)(STAGE_COMMANDS[_stage.step])
app.command("export")(export_cmd.export)
app.command("status")(status_cmd.status)
app.add_typer(concepts_cmd.app, name="concepts")
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    app()

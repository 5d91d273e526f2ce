"""Options and output shared by every stage command, so that they read and behave the same."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

import typer

from cocomix_cli.console import console

Force = Annotated[bool, typer.Option("--force", help="Overwrite a finished or different run's output.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the stage summary as JSON.")]


def report(result, as_json: bool, describe: Callable[[dict], str]) -> None:
    """The stage summary as one JSON line, or "up to date", or the stage's own one-line description."""
    if as_json:
        typer.echo(json.dumps({"stage": result.stage, "up_to_date": result.up_to_date, **result.summary}))
    elif result.up_to_date:
        console.print(
            f"{result.stage}: up to date ({result.dir}, fingerprint {result.fingerprint})",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(f"{result.stage}: {describe(result.summary)}", highlight=False, soft_wrap=True)


def report_stopped(ctx: typer.Context, result, fallback: str) -> None:
    """A training stage stopped by a signal: where it stopped, its checkpoint, and the command that continues
    it: the command as typed plus its resume flag (a bare one could resume another stage, or be refused, when
    flags or --set chose the settings), else `fallback`."""
    from cocomix_cli.context import INVOCATION
    from cocomix_cli.interrupts import resume_command

    stop = result.stopped
    again = resume_command(ctx.meta.get(INVOCATION)) or fallback
    console.print(
        f"{result.stage}: stopped by {stop.stopped_by} after step {stop.stopped_at_step}; checkpoint "
        f"{stop.checkpoint}. Continue with `{again}`.",
        highlight=False,
        soft_wrap=True,
    )

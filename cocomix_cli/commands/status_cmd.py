"""`cocomix status`: every stage of the run with its state, progress and fingerprint."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config

STATUS_STYLES = {"complete": "green", "running": "cyan", "interrupted": "yellow", "failed": "red"}


def status(
    ctx: typer.Context,
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="Run folder (sets `run.dir`).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the states as JSON.")] = False,
) -> None:
    """Show each stage of the run: status, progress and fingerprint."""
    cfg = resolve_config(ctx, {"run.dir": run_dir})
    from pipelines.stages import workflow

    states = workflow.stage_states(cfg.run.dir)
    if as_json:
        typer.echo(json.dumps({"run_dir": cfg.run.dir, "stages": states}, indent=2))
        return
    table = Table(title=f"run {cfg.run.dir}", title_justify="left")
    table.add_column("stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("fingerprint", no_wrap=True)
    table.add_column("progress", overflow="fold")
    for state in states:
        status_text = state["status"]
        table.add_row(
            state["stage"],
            f"[{STATUS_STYLES.get(status_text, 'dim')}]{status_text}[/]",
            state.get("fingerprint") or "",
            _progress_text(state),
        )
    console.print(table)


def _progress_text(state: dict) -> str:
    if state["status"] == "complete" and state.get("elapsed_s") is not None:
        return f"done in {state['elapsed_s']:.1f} s"
    if state["status"] == "failed":
        return (state.get("error") or "")[:60]
    return ", ".join(
        f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in state.get("progress", {}).items()
    )

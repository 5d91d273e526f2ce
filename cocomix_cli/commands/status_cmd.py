"""`cocomix status`: every stage of the run with its state, progress and fingerprint."""

from __future__ import annotations

import json
from pathlib import Path
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
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also read every output file of each complete stage and check it against the sha256 "
            "recorded when the stage finished; name each damaged file with the command that recomputes it "
            "and exit 1 if there is one.",
        ),
    ] = False,
) -> None:
    """Show each stage of the run: status, progress and fingerprint."""
    cfg = resolve_config(ctx, {"run.dir": run_dir})
    from pipelines.stages import status as stage

    states = stage.states(cfg.run.dir)
    damaged = stage.damaged(cfg.run.dir) if verify else []
    if as_json:
        report = {"run_dir": cfg.run.dir, "stages": states}
        if verify:
            report["damaged"] = {}
            for file in damaged:
                report["damaged"].setdefault(file.stage, []).append(file.path)
        typer.echo(json.dumps(report, indent=2))
        raise typer.Exit(1 if damaged else 0)
    # A folder that is not there is a run not started yet, or a mistyped --run-dir: say which it could be.
    missing = "" if Path(cfg.run.dir).is_dir() else " (no such folder yet: nothing has run there)"
    table = Table(title=f"run {cfg.run.dir}{missing}", title_justify="left")
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
    if not verify:
        return
    for file in damaged:
        console.print(
            f"damaged: {file.path} (sha256 differs from the one recorded, or missing); recompute it with "
            f"`{file.remedy}`",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    checked = sum(1 for s in states if s["status"] == "complete")
    console.print(f"verified {checked} complete stages: {len(damaged)} damaged files")
    if damaged:
        raise typer.Exit(1)


def _progress_text(state: dict) -> str:
    if state["status"] == "complete" and state.get("elapsed_s") is not None:
        return f"done in {state['elapsed_s']:.1f} s"
    if state["status"] == "failed":
        return (state.get("error") or "")[:60]
    return ", ".join(
        f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in state.get("progress", {}).items()
    )

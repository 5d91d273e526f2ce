"""`cocomix run`: the whole pipeline from `cocomix.toml`, skipping what is done and resuming what is not."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config
from pipelines.stages import workflow

ACTION_STYLES = {"skip": "green", "resume": "yellow", "run": "cyan", "refuse": "red"}
STEP_NAMES = ", ".join(workflow.steps())


def run(
    ctx: typer.Context,
    start: Annotated[
        str | None, typer.Option("--from", metavar="STEP", help=f"First step to run ({STEP_NAMES}).")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", metavar="STEP", help="Last step to run.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (each stage's state and action) and exit.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan or the run summary as JSON.")
    ] = False,
) -> None:
    """Run every stage: prepare, train-sae, extract-concepts, pretrain (each name of `run.objectives` once
    per seed of `run.seeds`), eval, a steering demo and the report.

    Finished stages are skipped, an interrupted one resumes where it stopped, and a stage whose settings
    changed is refused (set `run.dir` to a new folder). Ends with a summary table (the mean ± sd over
    seeds) and each student's paired difference from each of `run.baselines` (NTP by default) with its 95%
    t-interval; the run folder gets summary.json, report.md and loss_curves.png.
    """
    cfg = resolve_config(ctx)
    if dry_run:
        rows = workflow.plan(cfg, start, until)
        if as_json:
            typer.echo(json.dumps({"run_dir": cfg.run.dir, "plan": [dataclasses.asdict(r) for r in rows]}))
            return
        table = Table(title=f"cocomix run plan for {cfg.run.dir}", title_justify="left")
        for column in ("stage", "state", "action", "what"):
            table.add_column(column, overflow="fold", no_wrap=column == "stage")
        for row in rows:
            style = ACTION_STYLES.get(row.action, "")
            table.add_row(row.stage, escape(row.state), f"[{style}]{row.action}[/]", escape(row.detail))
        console.print(table)
        return

    def announce(index: int, total: int, row) -> None:
        if not as_json:
            console.print(
                f"[bold]\\[{index}/{total}] {row.stage}[/]: {row.action} ({escape(row.state)}) - "
                f"{escape(row.detail)}",
                highlight=False,
                soft_wrap=True,
            )

    summary = workflow.execute(cfg, start, until, progress=ctx.obj.progress, announce=announce)
    if summary is None:
        if not as_json:
            console.print(f"stopped after --until {until}; `cocomix run` continues from here.")
        return
    if as_json:
        typer.echo(json.dumps(summary))
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from pipelines.stages.report import paired_lines, skipped_notes, student_table

    table = Table(title=f"cocomix run {summary['run_dir']}", title_justify="left")
    table.add_column("")
    for objective in summary["objectives"]:
        table.add_column(objective, justify="right")
    for label, cells in student_table(summary):
        table.add_row(label, *cells)
    console.print(table)
    # The comparison the run exists for: each student against NTP on the same seeds, with its interval.
    ppl_tasks = tuple(t for t in next(iter(summary["objectives"].values()))["tasks"] if t.startswith("ppl:"))
    for line in paired_lines(summary, metrics=("val_ppl", *(f"{t} perplexity" for t in ppl_tasks))):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for note in skipped_notes(summary):
        console.print(f"skipped {note}", highlight=False, markup=False, soft_wrap=True)
    for demo in summary["steering"]:
        label = f" ({demo['label']})" if demo["label"] else ""
        console.print(
            f"steering concept {demo['concept']}{label} on {demo['prompt']!r}:", highlight=False, markup=False
        )
        for run in demo["runs"]:
            console.print(
                f"  {run['setting']:>10}: {run['text']!r}", highlight=False, markup=False, soft_wrap=True
            )
    run_dir = summary["run_dir"]
    files = [f"{run_dir}/{name}" for name in ("report.html", "report.md", "summary.json")]
    console.print(f"report: {', '.join(files)}, {summary['loss_curves']}")

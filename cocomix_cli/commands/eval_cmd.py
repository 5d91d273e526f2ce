"""`cocomix eval`: models side by side on perplexity and benchmarks (lm-eval v0.4 semantics)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config


def evaluate(
    ctx: typer.Context,
    tasks: Annotated[
        str | None,
        typer.Option(
            metavar="T1,T2",
            help="Comma-separated tasks: ppl, wikitext, lambada_openai, hellaswag, piqa, social_iqa, "
            "arc_easy, winogrande (`eval.tasks`).",
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            metavar="PATH",
            help="A model folder, or hf:PATH_OR_ID for a transformers LM; repeatable. Default: this run's "
            "pretrained students. RUN/pretrain-NAME of a run with `run.seeds` is its first seed.",
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data", metavar="TASK=PATH", help="A task's local data file; repeatable (`eval.data`)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N examples per task (`eval.limit`).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per forward (`eval.batch_size`).")] = None,
    device: Annotated[
        str | None, typer.Option(help="`auto`, `cpu`, `cuda` or `cuda:N` (`eval.device`).")
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option("--log-samples", help="Also write per-example JSONL under `RUN_DIR/eval/samples/`."),
    ] = False,
    backend: Annotated[
        str | None,
        typer.Option(
            help="`cocomix` (built-in and declared tasks, cached; eval/results.json) or `lm-eval` (any "
            "lm-eval task and the declared ones; eval/results-lm-eval.json) (`eval.backend`)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Score everything again: delete eval/ (cache and results) first.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Evaluate models on perplexity and the paper's benchmarks; results cached per (model, task, data)."""
    cfg = resolve_config(
        ctx,
        {
            "eval.tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
            "eval.models": model or None,
            "eval.data": data or None,
            "eval.limit": limit,
            "eval.batch_size": batch_size,
            "eval.device": device,
            "eval.backend": backend,
        },
    )
    from pipelines.stages import evaluate as stage

    results = stage.run(cfg, log_samples=log_samples, force=force, progress=ctx.obj.progress).summary
    if as_json:
        typer.echo(json.dumps(results))
        return
    from pipelines.stages.report import skipped_notes

    headers, rows = stage.eval_table(results["results"])
    # Every student's seeds in one column (mean ± sd), as `cocomix run` prints; --json has each seed.
    table = Table(title=f"eval ({stage.results_path(cfg)})", title_justify="left")
    table.add_column("task / metric")
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for label, cells in rows:
        table.add_row(label, *cells)
    if rows and rows[0][0] == "seeds":
        table.caption = "several seeds: mean ± sd over them; one seed: ± standard error"
    console.print(table)
    for note in skipped_notes(results):
        console.print(f"skipped {note}", highlight=False, markup=False, soft_wrap=True)

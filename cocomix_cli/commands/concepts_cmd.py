"""`cocomix concepts`: build and read the run's concept dictionary (what each SAE latent means)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config

app = typer.Typer(
    help="Build and read the concept dictionary (`concepts build|show|search|top`).", no_args_is_help=True
)
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command()
def build(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Build <run.dir>/concepts/dictionary.json from a concept store written with --store-sae-topk."""
    from pipelines.stages import concepts

    data, path = concepts.build(resolve_config(ctx))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in data.items() if k != "latents"}))
        return
    console.print(f"concepts: {data['latents_seen']:,} latents seen over {data['tokens']:,} tokens -> {path}")


@app.command()
def show(
    ctx: typer.Context,
    concept_id: Annotated[int, typer.Argument(metavar="ID")],
    as_json: AsJson = False,
    html: Annotated[
        bool,
        typer.Option(
            "--html",
            help="Also name the concept's page in the run's report.html (PATH#concept-ID), writing the "
            "report first when the page lacks it; open it in a browser.",
        ),
    ] = False,
) -> None:
    """One concept: label, frequencies, top tokens and contexts (the token in [[ ]])."""
    from pipelines.stages import concepts, report, workflow

    cfg = resolve_config(ctx)
    entry = concepts.entry(cfg, concept_id)
    page = report.concept_page(cfg, concept_id, lambda: workflow.plan(cfg)) if html else None
    if as_json:
        typer.echo(json.dumps({**entry, "page": page} if html else entry))
        return
    console.print(
        f"concept {entry['id']}: {entry['label']}  (active on {entry['frequency']:.3%} of tokens, "
        f"target on {entry['target_frequency']:.3%})",
        highlight=False,
    )
    console.print(
        "top tokens: " + ", ".join(f"{t['token']!r} {t['activation']:.1f}" for t in entry["top_tokens"])
    )
    for context in entry["contexts"]:
        console.print(f"  {context['activation']:7.2f}  {context['text']!r}", highlight=False, markup=False)
    if page is not None:
        console.print(f"page: {page}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def search(
    ctx: typer.Context, text: Annotated[str, typer.Argument()], limit: int = 20, as_json: AsJson = False
) -> None:
    """Concepts whose top tokens or contexts contain TEXT, most frequent first."""
    from pipelines.stages import concepts

    _print_entries(concepts.search(resolve_config(ctx), text, limit), as_json, f"concepts matching {text!r}")


@app.command()
def top(ctx: typer.Context, n: int = 20, as_json: AsJson = False) -> None:
    """The concepts most often chosen as CoCoMix targets."""
    from pipelines.stages import concepts

    _print_entries(concepts.top(resolve_config(ctx), n), as_json, "most frequent targets")


def _print_entries(entries: list[dict], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(entries))
        return
    table = Table(title=title)
    for column in ("id", "label", "active", "target"):
        table.add_column(column)
    for e in entries:
        table.add_row(str(e["id"]), e["label"], f"{e['frequency']:.3%}", f"{e['target_frequency']:.3%}")
    console.print(table)

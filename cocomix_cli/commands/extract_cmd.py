"""`cocomix extract-concepts`: concept targets per token into `<run.dir>/extract-concepts/concepts.zarr`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config


def extract_concepts(
    ctx: typer.Context,
    store_hidden: Annotated[
        bool | None, typer.Option("--store-hidden", help="Also store the teacher's h and gradient (float16).")
    ] = None,
    store_sae_topk: Annotated[
        bool | None, typer.Option("--store-sae-topk", help="Also store the SAE's top-k ids and activations.")
    ] = None,
    store_teacher_topk: Annotated[
        int | None,
        typer.Option("--store-teacher-topk", metavar="N", help="Also store the teacher's top-N log-probs."),
    ] = None,
    from_hidden: Annotated[
        str | None,
        typer.Option(
            "--from-hidden",
            metavar="STORE",
            help="Recompute targets from a concepts.zarr written with --store-hidden, without the teacher.",
        ),
    ] = None,
    shard: Annotated[
        str, typer.Option(metavar="I/N", help="Fill only chunk I of every N (for array jobs); default 0/1.")
    ] = "0/1",
    device: Annotated[
        str | None, typer.Option(help="`auto`, `cpu`, `cuda` or `cuda:N` (`extract.device`).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a finished or different run's output.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stage summary as JSON.")] = False,
) -> None:
    """Compute the teacher's top-K SAE concepts per token (concepts.zarr); resumable and shardable."""
    cfg = resolve_config(
        ctx,
        {
            "extract.store_hidden": store_hidden,
            "extract.store_sae_topk": store_sae_topk,
            "extract.store_teacher_topk": store_teacher_topk,
            "extract.device": device,
            "extract.hidden_from": from_hidden,
        },
    )
    from pipelines import extract as stage

    result = stage.run(cfg, force=force, progress=ctx.obj.progress, shard=stage.Shard.parse(shard))
    s = result.summary
    if as_json:
        typer.echo(json.dumps({"stage": result.stage, "up_to_date": result.up_to_date, **s}))
    elif result.up_to_date:
        console.print(
            f"extract-concepts: up to date ({result.dir}, fingerprint {result.fingerprint})", soft_wrap=True
        )
    elif s["chunks_done"] < s["chunks_total"]:
        console.print(
            f"extract-concepts: shard {shard} done, {s['chunks_done']}/{s['chunks_total']} chunks in the "
            "store; it completes when every shard has finished.",
            soft_wrap=True,
        )
    else:
        rate = f"{s['tokens_per_s']:,.0f} tok/s" if s["tokens_per_s"] else "no chunk computed here"
        console.print(
            f"extract-concepts: {s['tokens']:,} tokens, {s['bytes_per_token']} bytes/token -> "
            f"{s['store']} [{rate}]",
            highlight=False,
            soft_wrap=True,
        )

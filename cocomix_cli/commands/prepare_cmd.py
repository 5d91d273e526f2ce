"""`cocomix prepare`: tokenize the corpus into `<run.dir>/prepare/tokens.zarr`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config


def prepare(
    ctx: typer.Context,
    source: Annotated[
        str | None, typer.Option(help="Corpus file, glob or HF dataset id (sets `data.source`).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer hub id, folder, tokenizer.json or .gguf (`data.tokenizer`).")
    ] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per block (`data.block_size`).")] = None,
    max_documents: Annotated[
        int | None, typer.Option(help="Read at most this many documents (`data.max_documents`).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Stop after this many tokens (`data.max_tokens`).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a finished or different run's output.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stage summary as JSON.")] = False,
) -> None:
    """Tokenize the corpus into train/val token blocks (tokens.zarr); resumes if interrupted."""
    cfg = resolve_config(
        ctx,
        {
            "data.source": source,
            "data.tokenizer": tokenizer,
            "data.block_size": block_size,
            "data.max_documents": max_documents,
            "data.max_tokens": max_tokens,
        },
    )
    from pipelines import prepare as stage

    result = stage.run(cfg, force=force, progress=ctx.obj.progress)
    if as_json:
        typer.echo(json.dumps({"stage": result.stage, "up_to_date": result.up_to_date, **result.summary}))
    elif result.up_to_date:
        console.print(
            f"prepare: up to date ({result.dir}, fingerprint {result.fingerprint})",
            highlight=False,
            soft_wrap=True,
        )
    else:
        s = result.summary
        console.print(
            f"prepare: {s['train_blocks']:,} train + {s['val_blocks']:,} val blocks of {cfg.data.block_size} "
            f"tokens ({s['dtype']}) from {s['documents']:,} documents -> {s['store']} "
            f"[{s['tokens_per_s'] or 0:,.0f} tok/s]",
            highlight=False,
            soft_wrap=True,
        )

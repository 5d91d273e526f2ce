"""`cocomix prepare`: tokenize the corpus into `<run.dir>/prepare/tokens.zarr`."""

from __future__ import annotations

from typing import Annotated

import typer

from cocomix_cli.context import resolve_config
from cocomix_cli.options import AsJson, Force, report


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
    force: Force = False,
    as_json: AsJson = False,
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
    from pipelines.stages import prepare as stage

    result = stage.run(cfg, force=force, progress=ctx.obj.progress)
    report(
        result,
        as_json,
        lambda s: (
            f"{s['train_blocks']:,} train + {s['val_blocks']:,} val blocks of {cfg.data.block_size} tokens "
            f"({s['dtype']}) from {s['documents']:,} documents -> {s['store']} "
            f"[{s['tokens_per_s'] or 0:,.0f} tok/s]"
        ),
    )

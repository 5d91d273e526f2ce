"""`cocomix extract-concepts`: concept targets per token into `<run.dir>/extract-concepts/concepts.zarr`."""

from __future__ import annotations

from typing import Annotated

import typer

from cocomix_cli.context import resolve_config
from cocomix_cli.options import AsJson, Force, report


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
    force: Force = False,
    as_json: AsJson = False,
) -> None:
    """Compute the teacher's top-K SAE concepts per token (concepts.zarr); resumable and shardable.

    SIGTERM or Ctrl-C stop it at once (exit 130) and keep the finished chunks; the same command (without
    --force) resumes from them and ends with the store an uninterrupted run writes.
    """
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
    from pipelines.stages import extract as stage

    result = stage.run(cfg, force=force, progress=ctx.obj.progress, shard=stage.Shard.parse(shard))
    report(result, as_json, lambda s: _describe(s, shard))


def _describe(s: dict, shard: str) -> str:
    if s["chunks_done"] < s["chunks_total"]:
        return (
            f"shard {shard} done, {s['chunks_done']}/{s['chunks_total']} chunks in the store; "
            "it completes when every shard has finished."
        )
    rate = f"{s['tokens_per_s']:,.0f} tok/s" if s["tokens_per_s"] else "no chunk computed here"
    return f"{s['tokens']:,} tokens, {s['bytes_per_token']} bytes/token -> {s['store']} [{rate}]"

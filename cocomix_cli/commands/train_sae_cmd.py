"""`cocomix train-sae`: a TopK SAE on the teacher's hook, into `<run.dir>/train-sae/sae` (SAELens format)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config


def train_sae(
    ctx: typer.Context,
    device: Annotated[
        str | None, typer.Option(help="`auto`, `cpu`, `cuda` or `cuda:N` (`sae.device`).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a finished or different run's output.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stage summary as JSON.")] = False,
) -> None:
    """Train a TopK sparse autoencoder on the teacher's activations (Gao et al. recipe); resumable."""
    cfg = resolve_config(ctx, {"sae.device": device})
    from pipelines import train_sae as stage

    result = stage.run(cfg, force=force, progress=ctx.obj.progress)
    s = result.summary
    if as_json:
        typer.echo(json.dumps({"stage": result.stage, "up_to_date": result.up_to_date, **s}))
    elif result.up_to_date:
        console.print(
            f"train-sae: up to date ({result.dir}, fingerprint {result.fingerprint})", soft_wrap=True
        )
    else:
        console.print(
            f"train-sae: {s['latents']} latents, k={s['k']}, {s['tokens']:,} tokens -> {s['sae']}: "
            f"FVU {s['fvu']:.4f}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.1%}, "
            f"loss {s['loss_clean']:.3f} -> {s['loss_spliced']:.3f} spliced "
            f"({s['loss_zero_ablation']:.3f} zeroed)",
            highlight=False,
            soft_wrap=True,
        )

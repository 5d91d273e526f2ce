"""`cocomix train-sae`: an SAE on the teacher's hook, into `<run.dir>/train-sae/sae` (SAELens format)."""

from __future__ import annotations

from typing import Annotated

import typer

from cocomix_cli.context import resolve_config
from cocomix_cli.options import AsJson, Force, report, report_stopped


def train_sae(
    ctx: typer.Context,
    device: Annotated[
        str | None, typer.Option(help="`auto`, `cpu`, `cuda` or `cuda:N` (`sae.device`).")
    ] = None,
    force: Force = False,
    as_json: AsJson = False,
) -> None:
    """Train a sparse autoencoder (`sae.architecture`: TopK by default) on the teacher's activations (Gao et
    al. recipe; dead latents resampled by default, `sae.dead_latents`); resumable. SIGTERM or Ctrl-C finish
    the current step, save a checkpoint and exit 0; the same command resumes."""
    cfg = resolve_config(ctx, {"sae.device": device})
    from pipelines.stages import train_sae as stage

    result = stage.run(cfg, force=force, progress=ctx.obj.progress)
    if result.stopped is not None and not as_json:
        report_stopped(ctx, result, "cocomix train-sae")
        return
    report(
        result,
        as_json,
        lambda s: (
            f"{s['architecture']} SAE, {s['latents']} latents, k={s['k']}, {s['tokens']:,} tokens -> "
            f"{s['sae']}: FVU {s['fvu']:.4f}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.1%} "
            f"({s.get('resampled', 0):,} restarts), loss {s['loss_clean']:.3f} -> "
            f"{s['loss_spliced']:.3f} spliced ({s['loss_zero_ablation']:.3f} zeroed)"
        ),
    )

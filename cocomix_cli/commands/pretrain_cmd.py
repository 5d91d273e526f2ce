"""`cocomix pretrain`: train the student into `<run.dir>/pretrain-<name>[-online][-seed<k>]/`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from cocomix_cli.context import resolve_config
from cocomix_cli.options import AsJson, Force, report, report_stopped
from pipelines.config.schema import MODEL_PRESETS, spell_choices
from pipelines.config.students import student_config, with_first_run_seed
from pipelines.errors import ConfigError
from pipelines.objectives.declaration import objective_names


def pretrain(
    ctx: typer.Context,
    objective: Annotated[
        str | None,
        typer.Option(
            help=f"{spell_choices(objective_names())}, or one of `pretrain.plugins` (`pretrain.objective`)."
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Train the student `[run.variants.NAME]` (its objective and overrides) into "
            "pretrain-NAME/; instead of --objective.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="The student's seed (init and data order; `pretrain.seed`), trained into "
            "`pretrain-NAME-seedK/`; default: the first of `run.seeds` when the run has seeds (the student "
            "`cocomix run` trains), else `run.seed` in `pretrain-NAME/`."
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help=f"Model size: {spell_choices(MODEL_PRESETS)} (`pretrain.preset`).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimiser steps (`pretrain.max_steps`).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the stage's latest checkpoint.")
    ] = False,
    online_teacher: Annotated[
        bool,
        typer.Option(
            "--online-teacher",
            help="CoCoMix: compute concept targets with the teacher and SAE every step (the official code's "
            "way) instead of reading concepts.zarr; writes pretrain-cocomix-online/.",
        ),
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="`auto`, `cpu`, `cuda` or `cuda:N` (`pretrain.device`).")
    ] = None,
    force: Force = False,
    as_json: AsJson = False,
) -> None:
    """Pretrain the student (NTP, CoCoMix, KD or pause) from the cached stores; exactly resumable.

    SIGTERM or Ctrl-C finish the current step, save a checkpoint and exit 0; a second one stops at once
    (exit 130). Either way the same command with `--resume` continues from the last checkpoint.
    Under `torchrun --nproc_per_node N` it trains data-parallel: the global batch is
    batch_blocks x N x grad_accum.
    """
    if variant is not None and objective is not None:
        raise ConfigError("Pass --objective or --variant, not both: a variant names its own objective.")
    cfg = resolve_config(
        ctx,
        {
            "pretrain.objective": objective,
            "pretrain.preset": preset,
            "pretrain.max_steps": max_steps,
            "pretrain.device": device,
            "pretrain.seed": seed,
        },
    )
    if variant is not None:
        cfg = student_config(cfg, variant, seed)
    cfg = with_first_run_seed(cfg)
    from pipelines.stages import pretrain as stage

    result = stage.run(
        cfg, online_teacher=online_teacher, resume=resume, force=force, progress=ctx.obj.progress
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports for all
    if result.stopped is not None:
        if as_json:
            report(result, as_json, str)
            return
        report_stopped(ctx, result, "cocomix pretrain --resume")
        return
    report(result, as_json, _describe)


def _describe(s: dict) -> str:
    speed = f", {s['tokens_per_s']:,.0f} tok/s" if s.get("tokens_per_s") else ""
    return (
        f"{s['steps']:,} steps, {s['tokens']:,} tokens -> {s['model']}: val loss {s['val_loss']:.4f} "
        f"(ppl {s['val_ppl']:.2f}), train loss {s['train_loss']:.4f}{speed}"
    )

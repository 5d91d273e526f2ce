"""`cocomix export MODEL OUT`: a student as a transformers folder, optionally uploaded to the hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cocomix_cli.console import console
from cocomix_cli.options import AsJson, Force


def export(
    model: Annotated[
        Path,
        typer.Argument(
            help="A student: a model folder, or a `pretrain-*` stage folder (its `model/`); "
            "`pretrain-NAME` of a run trained per seed is its lowest seed."
        ),
    ],
    out: Annotated[
        Path, typer.Argument(help="Folder to write (replaced whole if it holds an earlier export).")
    ],
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            metavar="REPO",
            help="Upload the folder to this hub model repo (created if missing); needs a token "
            "(`hf auth login` or HF_TOKEN).",
        ),
    ] = None,
    private: Annotated[bool, typer.Option(help="Create the hub repo as private.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --push-to-hub: export and list what would be uploaded.")
    ] = False,
    force: Force = False,
    as_json: AsJson = False,
) -> None:
    """Write a student (NTP, CoCoMix or pause) as a folder `AutoModelForCausalLM` loads.

    NTP students become `GPT2LMHeadModel` folders. CoCoMix and pause students become `CocomixForCausalLM`
    folders with their modeling code: load them with `trust_remote_code=True` where cocomix is not
    installed. Every folder holds the tokenizer and loads back into cocomix (`cocomix eval`, `steer`).
    """
    from pipelines.stages import export as export_stage

    summary = export_stage.run(model, out, push_to_hub, private=private, dry_run=dry_run, force=force)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console.print(
        f"export: {summary['class']} -> {summary['out']} "
        f"({len(summary['files'])} files, {summary['bytes'] / 1e6:.1f} MB)",
        highlight=False,
        soft_wrap=True,
    )
    if push_to_hub and dry_run:
        console.print(f"would upload to {push_to_hub}:", highlight=False)
        for entry in summary["files"]:
            console.print(f"  {entry['path']}  {entry['bytes']:,} bytes", highlight=False, soft_wrap=True)
    elif push_to_hub:
        console.print(f"uploaded to {push_to_hub}: {summary['commit']}", highlight=False, soft_wrap=True)

"""`cocomix export MODEL OUT`: a student as a transformers folder, optionally uploaded to the hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cocomix_cli.console import console
from cocomix_cli.options import AsJson, Force
from pipelines.errors import InputError


def export(
    model: Annotated[
        Path, typer.Argument(help="A student: a model folder, or a `pretrain-*` stage folder (its `model/`).")
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
    from pipelines.model import hf_export

    if push_to_hub and not dry_run:
        from huggingface_hub import get_token

        if not get_token():  # before the export, so that a long export does not end in this error
            raise InputError(
                f"--push-to-hub {push_to_hub} needs a HuggingFace token: {hf_export.TOKEN_HELP}."
            )
    out = out.absolute()
    _check_out(out, force)
    folder = hf_export.export_student(model, out)
    plan = hf_export.upload_plan(folder)
    summary = {
        "model": str(model),
        "out": str(folder),
        "class": json.loads((folder / "config.json").read_text())["architectures"][0],
        "files": [{"path": path, "bytes": size} for path, size in plan],
        "bytes": sum(size for _, size in plan),
    }
    if push_to_hub:
        summary["repo"] = push_to_hub
        if dry_run:
            summary["uploaded"] = False
        else:
            summary["commit"] = hf_export.push_to_hub(folder, push_to_hub, private=private)
            summary["uploaded"] = True
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console.print(
        f"export: {summary['class']} -> {folder} ({len(plan)} files, {summary['bytes'] / 1e6:.1f} MB)",
        highlight=False,
        soft_wrap=True,
    )
    if push_to_hub and dry_run:
        console.print(f"would upload to {push_to_hub}:", highlight=False)
        for path, size in plan:
            console.print(f"  {path}  {size:,} bytes", highlight=False, soft_wrap=True)
    elif push_to_hub:
        console.print(f"uploaded to {push_to_hub}: {summary['commit']}", highlight=False, soft_wrap=True)


def _check_out(out: Path, force: bool) -> None:
    """Never replace a folder that is not an earlier export unless told to: it may hold anything."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another OUT.")
    config = out / "config.json"
    earlier = config.exists() and json.loads(config.read_text()).get("model_type") in ("cocomix", "gpt2")
    if any(out.iterdir()) and not earlier and not force:
        raise InputError(
            f"{out} is not empty and holds no earlier export; choose another OUT or pass --force."
        )

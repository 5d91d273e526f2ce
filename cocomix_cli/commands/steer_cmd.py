"""`cocomix steer`: generate with and without amplifying concepts, or inspect the concepts per token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cocomix_cli.console import console
from cocomix_cli.context import resolve_config
from pipelines.errors import ConfigError


def steer(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="CoCoMix model folder (`steer.model`; default: the run's)."),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeatable.")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="A text file with one prompt per line.")
    ] = None,
    concept: Annotated[
        str | None, typer.Option(metavar="ID[,ID...]", help="Concept ids (SAE latents) to steer.")
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(help="Multiply the concepts' logits by S before the top-k (paper: -10..10)."),
    ] = None,
    set_value: Annotated[
        float | None, typer.Option("--set-value", help="Pin the concepts' logits to V.")
    ] = None,
    sweep: Annotated[
        str | None, typer.Option(metavar="S1,S2,...", help="One continuation per scale, e.g. -10,-5,0,5,10.")
    ] = None,
    teacher: Annotated[
        bool,
        typer.Option(
            "--teacher",
            help="Also amplify the same SAE latents in the teacher's residual stream at the hook ([teacher], "
            "[sae]) and generate with the teacher, for comparison.",
        ),
    ] = False,
    inspect: Annotated[
        bool, typer.Option("--inspect", help="Show each prompt token's top predicted concepts instead.")
    ] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens per continuation (`steer.max_new_tokens`).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Sampling seed, shared by all continuations (`steer.seed`).")
    ] = None,
    device: Annotated[str, typer.Option(help="`cpu`, `cuda` or `cuda:N`.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Steer a CoCoMix student by amplifying concepts, side by side with the unsteered text; or --inspect."""
    cfg = resolve_config(
        ctx, {"steer.model": model, "steer.max_new_tokens": max_new_tokens, "steer.seed": seed}
    )
    from pipelines.stages import steer as stage

    prompts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise ConfigError(f"--prompts-file {prompts_file} does not exist.")
        prompts += [line for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("Give a prompt with --prompt TEXT (repeatable) or --prompts-file FILE.")

    if inspect:
        results = stage.inspect(cfg, prompts, device)
        if as_json:
            typer.echo(json.dumps(results))
            return
        for result in results:
            table = Table(title=f"concepts predicted after each token of {result['prompt']!r}")
            table.add_column("#", justify="right")
            table.add_column("token")
            table.add_column("top concepts (id: logit)")
            for row in result["tokens"]:
                concepts = ", ".join(
                    f"{c['id']}" + (f" ({c['label']})" if c["label"] else "") + f": {c['logit']:.2f}"
                    for c in row["concepts"]
                )
                table.add_row(str(row["position"]), repr(row["token"]), concepts)
            console.print(table)
        return

    concept_ids = _parse_ints(concept, "--concept")
    scales = _parse_floats(sweep, "--sweep") if sweep else ([scale] if scale is not None else [])
    if not concept_ids or (not scales and set_value is None):
        raise ConfigError(
            "Steering needs --concept ID[,ID...] and one of --scale S, --sweep S1,S2,... or --set-value V."
        )
    results = stage.steer(cfg, prompts, concept_ids, scales, set_value, device, with_teacher=teacher)
    if as_json:
        typer.echo(json.dumps(results))
        return
    for result in results:
        labels = result["labels"]
        named = ", ".join(
            f"{c}" + (f" ({labels[str(c)]})" if labels.get(str(c)) else "") for c in result["concepts"]
        )
        console.print(
            f"prompt {result['prompt']!r}, concepts {named}", highlight=False, markup=False, soft_wrap=True
        )
        table = Table(show_lines=True)
        table.add_column("setting", no_wrap=True)
        table.add_column("continuation (newlines shown as \\n)")
        for run in result["runs"]:
            table.add_row(run["setting"], run["text"].replace("\n", "\\n"))
        console.print(table)


def _parse_ints(text: str | None, flag: str) -> list[int]:
    try:
        return [int(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}.") from None


def _parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}.") from None

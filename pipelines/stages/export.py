"""`cocomix export`: a student as a folder `AutoModelForCausalLM` loads, optionally uploaded to the hub.

The conversion itself is `pipelines.model.hf_export`; this stage owns what surrounds it: which OUT folders it
may replace, the token check that comes before a long export rather than after it, and the summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.core.layout import seeded_student
from pipelines.errors import InputError
from pipelines.model import hf_export


def run(
    model: Path,
    out: Path,
    push_to_hub: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Export `model` (a model folder or a `pretrain-*` stage folder) to `out`; upload it to `push_to_hub`
    unless `dry_run`. Returns the summary: the class written, the files with their sizes, the commit."""
    if push_to_hub and not dry_run:
        from huggingface_hub import get_token

        if not get_token():
            raise InputError(
                f"--push-to-hub {push_to_hub} needs a HuggingFace token: {hf_export.TOKEN_HELP}."
            )
    model = seeded_student(model)  # `pretrain-cocomix` of a seeded run: its lowest seed on disk
    out = out.absolute()
    check_out(out, force)
    folder = hf_export.export_student(model, out)
    plan = hf_export.upload_plan(folder)
    summary: dict[str, Any] = {
        "model": str(model),
        "out": str(folder),
        "class": json.loads((folder / "config.json").read_text())["architectures"][0],
        "files": [{"path": path, "bytes": size} for path, size in plan],
        "bytes": sum(size for _, size in plan),
    }
    if push_to_hub:
        summary["repo"] = push_to_hub
        summary["uploaded"] = not dry_run
        if not dry_run:
            summary["commit"] = hf_export.push_to_hub(folder, push_to_hub, private=private)
    return summary


def check_out(out: Path, force: bool) -> None:
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

"""`cocomix status`: every stage of a run with its state, and with `--verify` the finished outputs whose
bytes no longer match the digests recorded when their stage completed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.files import read_json
from pipelines.core.integrity import damaged_outputs
from pipelines.core.layout import MANIFEST, stage_command
from pipelines.core.session import stage_states


@dataclass(frozen=True)
class Damaged:
    stage: str
    path: str  # as under the run folder's parent, the way the run folder was named
    remedy: str  # the command that recomputes it


def states(run_dir: Path) -> list[dict[str, Any]]:
    """Each stage's status, progress, fingerprint and summary (`cocomix status --json`)."""
    return stage_states(run_dir)


def damaged(run_dir: Path) -> list[Damaged]:
    """Every damaged output file of the run's complete stages, after reading each file its manifest records
    a digest of."""
    found = []
    for state in stage_states(run_dir):
        if state["status"] != "complete":
            continue
        stage_dir = Path(run_dir) / state["stage"]
        remedy = f"{stage_command(state['stage'])} --force"
        for path in damaged_outputs(stage_dir, read_json(stage_dir / MANIFEST) or {}):
            found.append(Damaged(state["stage"], str(path), remedy))
    return found

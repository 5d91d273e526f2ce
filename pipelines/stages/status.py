"""`cocomix status`: every stage of a run with its state, and with `--verify` the finished outputs whose
bytes no longer match the digests recorded when their stage completed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.layout import stage_command
from pipelines.core.session import damaged_stages, stage_states


@dataclass(frozen=True)
class Damaged:
    stage: str
    path: str  # as under the run folder's parent, the way the run folder was named
    remedy: str  # the command that recomputes it


def states(run_dir: Path) -> list[dict[str, Any]]:
    """Each stage's status, progress, fingerprint and summary (`cocomix status --json`)."""
    return stage_states(run_dir)


def damaged(run_dir: Path) -> list[Damaged]:
    """Every damaged output file of the run's complete stages; reads each file once."""
    return [
        Damaged(stage, path, f"{stage_command(stage)} --force")
        for stage, paths in damaged_stages(run_dir).items()
        for path in paths
    ]

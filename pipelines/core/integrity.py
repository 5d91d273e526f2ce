"""Digests of finished outputs, recorded when a stage completes and checked by every stage that reads them.

A stage's manifest lists the sha256 of every file of its outputs (each Zarr chunk, each weights file).
A reader checks them all before it starts, so a flipped byte, a truncated chunk or a missing file is
reported once, naming the file and the command that makes it again, instead of being trained on or ending
in a decompression traceback. Verifying costs about a second per GiB of store (about half of one pass of
zarr reads; `benchmarks/verify_digests.py`, docs/BENCHMARKS.md), paid once per stage, never per step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipelines.errors import InputError


def sha256_file(path: Path) -> str:
    """The sha256 of a file's content, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `root` (or of `root` itself when it is a file)."""
    root = Path(root)
    if root.is_file():
        return {root.name: sha256_file(root)}
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def damaged_files(root: Path, recorded: dict[str, str]) -> list[str]:
    """The files under `root` whose content differs from `recorded`, or that are missing."""
    return [name for name, path in _recorded_paths(Path(root), recorded) if _differs(path, recorded[name])]


def damaged_outputs(stage_dir: Path, manifest: dict) -> list[Path]:
    """Every output file a finished stage's manifest records whose content differs, or that is missing."""
    damaged = []
    for output, recorded in manifest.get("outputs", {}).items():
        paths = _recorded_paths(Path(stage_dir) / output, recorded)
        damaged += [path for name, path in paths if _differs(path, recorded[name])]
    return damaged


def _recorded_paths(root: Path, recorded: dict[str, str]) -> list[tuple[str, Path]]:
    # A one-file output records its own name; a tree records paths relative to its folder.
    single = len(recorded) == 1 and next(iter(recorded)) == root.name and not root.is_dir()
    return [(name, root if single else root / name) for name in sorted(recorded)]


def _differs(path: Path, digest: str) -> bool:
    return not path.is_file() or sha256_file(path) != digest


def refuse_damaged_outputs(stage_dir: Path, manifest: dict, stage: str, remedy: str) -> None:
    """A finished stage whose files no longer match the digests recorded at completion is not up to date:
    say which, and the command (`remedy`) that makes them again."""
    damaged = damaged_outputs(stage_dir, manifest)
    if damaged:
        more = f" and {len(damaged) - 1} more of its files" if len(damaged) > 1 else ""
        raise InputError(
            f"`{stage}` is complete, but {damaged[0]}{more} changed on disk since it finished (its sha256 "
            "differs from the one recorded, or it is missing): the data is damaged. Recompute it with "
            f"`{remedy}`."
        )


def verify(root: Path, recorded: dict[str, str], remedy: str) -> None:
    """Refuse to read `root` when any recorded file differs; `remedy` is the command that recomputes it."""
    damaged = damaged_files(root, recorded)
    if damaged:
        root = Path(root)
        first = root if root.is_file() else root / damaged[0]
        more = f" and {len(damaged) - 1} more of its files" if len(damaged) > 1 else ""
        raise InputError(
            f"{first}{more} changed on disk since it was written (its sha256 differs from the one recorded "
            f"when the stage finished): the data is damaged. Recompute it with `{remedy}`."
        )

"""How every stage starts and ends: `StageSession` locks the stage folder, decides whether the stage is up to
date, resumes, starts fresh or must refuse, and records the outcome in its manifest; `finished_upstream`
is how a stage reads another's finished output.

A manifest says whether the stage is `running`, `complete` or `failed`, and holds the fingerprint of its
inputs (`pipelines.core.fingerprints`) and the digests of its outputs (`pipelines.core.integrity`).

Just over 400 lines, kept whole: the session, the reading of finished upstream stages and the states
`cocomix status` lists all apply one set of manifest rules (status, fingerprint, orphan outputs), which a
split would spread over modules that must agree.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import __version__
from pipelines.core import integrity
from pipelines.core.files import atomic_write_json, now_iso, read_json
from pipelines.core.fingerprints import changed_keys, fingerprint, shorten
from pipelines.core.layout import CHUNKS_DIR, MANIFEST, RUN_MARKER, STAGES, stage_command
from pipelines.core.locks import (
    LOCK_FILE,
    MANIFEST_LOCK,
    READER_PREFIX,
    UNNAMED_READER_PREFIX,
    ReadLock,
    StageLock,
    refuse_while_read,
    writer_holders,
)
from pipelines.errors import CocomixError, StageError

log = logging.getLogger(__name__)


def ensure_run_dir(root: Path) -> Path:
    """Create the run folder, or check that an existing one is a cocomix run folder."""
    root = Path(root)
    marker = root / RUN_MARKER
    if root.exists() and not root.is_dir():
        raise StageError(f"`run.dir` ({root}) is a file. Set `run.dir` to a folder.")
    if root.is_dir() and not marker.exists() and any(root.iterdir()):
        raise StageError(
            f"`run.dir` ({root}) holds files that are not a cocomix run (no {RUN_MARKER}). "
            "Set `run.dir` to a new or empty folder."
        )
    try:
        if not marker.exists():
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, {"tool": "cocomix", "created_at": now_iso(), "version": __version__})
        probe = root / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise StageError(
            f"`run.dir` ({root}) cannot be written to ({exc.strerror}). Set `run.dir` to a folder you can "
            "write to."
        ) from None
    return root


@dataclass(frozen=True)
class Stopped:
    """A stage that a signal stopped before it finished, and the checkpoint it resumes from (the field
    names are the keys of its summary, as `--json` prints it)."""

    stopped_by: str
    stopped_at_step: int
    checkpoint: str | None


@dataclass
class StageResult:
    """What a stage's `run` returns: where it wrote, whether it had anything to do, and its summary;
    `stopped` when a signal ended it early (resumable)."""

    stage: str
    dir: Path
    up_to_date: bool
    summary: dict[str, Any]
    fingerprint: str
    stopped: Stopped | None = None


class StageSession:
    """One attempt at a stage: lock, decide (up to date / resume / fresh / refuse), record the outcome.

    Use as a context manager. After entering, `up_to_date` says the stage is already complete with the same
    fingerprint (its summary is in `summary`); otherwise `resuming` says whether the outputs on disk are a
    partial run of the same fingerprint that the stage may continue. Leaving the block without `complete()`
    marks the stage `failed` for user errors, and leaves it `running` (resumable) for interruptions.
    """

    def __init__(
        self,
        run_dir: Path,
        stage: str,
        inputs: Mapping[str, Any],
        files: list[dict[str, Any]] | None = None,
        input_artifacts: Mapping[str, str] | None = None,
        force: bool = False,
        worker: str | None = None,
        rerun_on_change: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.dir = self.run_dir / stage
        self.inputs = dict(inputs)
        for identity in files or []:
            self.inputs[f"file:{identity.get('name', identity['path'])}"] = identity["sha256"]
        self.files = files or []
        self.input_artifacts = dict(input_artifacts or {})
        self.fingerprint = fingerprint(
            {**self.inputs, **{f"artifact:{k}": v for k, v in self.input_artifacts.items()}}
        )
        self.force = force
        # A stage whose outputs are a cache keyed by content (`eval`): other inputs start a new attempt over
        # the same outputs, without --force, instead of being refused as another run's stage.
        self.rerun_on_change = rerun_on_change
        self.up_to_date = False
        self.resuming = False
        self.summary: dict[str, Any] = {}
        # Workers (shards, ranks) of one stage run side by side: each holds its own lock, and the manifest
        # is read and written under a short shared `.lock-manifest`.
        self.worker = worker
        self._lock = StageLock(self.dir, stage, f"{LOCK_FILE}-{worker}" if worker else LOCK_FILE)
        self._manifest: dict[str, Any] = {}
        self._complete_before: dict[str, Any] | None = None
        self._started = time.monotonic()

    def __enter__(self) -> StageSession:
        ensure_run_dir(self.run_dir)
        self.dir.mkdir(exist_ok=True)
        self._lock.acquire()
        try:
            with self.manifest_lock():
                self._decide(read_json(self.dir / MANIFEST))
        except BaseException:
            self._lock.release()
            raise
        return self

    @contextlib.contextmanager
    def manifest_lock(self):
        """Serialise manifest decisions between the workers of a stage (a no-op for a single writer)."""
        if self.worker is None:
            yield
            return
        lock = StageLock(self.dir, self.stage, MANIFEST_LOCK)
        lock.acquire(wait=True)
        try:
            yield
        finally:
            lock.release()

    def reload(self) -> dict[str, Any]:
        """The manifest as on disk now (other workers may have written it)."""
        self._manifest = read_json(self.dir / MANIFEST) or self._manifest
        return self._manifest

    def _decide(self, previous: dict[str, Any] | None) -> None:
        orphans = previous is None and not self.rerun_on_change and holds_orphan_outputs(self.dir)
        if orphans and not self.force:
            raise StageError(
                f"{self.dir} holds outputs but no {MANIFEST}, so nothing says which run they belong to or "
                "whether they are finished. Pass --force to delete them and run the stage again, or set "
                "`run.dir` to a new folder."
            )
        if previous and previous.get("fingerprint") == self.fingerprint and not self.force:
            if previous.get("status") == "complete":
                integrity.refuse_damaged_outputs(
                    self.dir, previous, self.stage, f"{stage_command(self.stage)} --force"
                )
                self.up_to_date, self.summary, self._manifest = True, previous.get("summary", {}), previous
                return
            # A failed attempt resumes too: what it finished is still valid (and, for a stage shared by
            # shards, belongs to the other shards as well).
            if previous.get("status") in ("running", "failed"):
                self.resuming = True
                self._manifest = previous
                self._manifest.pop("error", None)
                self._manifest.update(status="running", resumed_at=now_iso())
                self._write()
                return
        refused = previous and previous.get("status") in ("complete", "running") and not self.rerun_on_change
        if refused and not self.force:
            changes = changed_keys(previous.get("inputs", {}), self.inputs)
            changes += changed_keys(
                {f"artifact:{k}": v for k, v in previous.get("input_artifacts", {}).items()},
                {f"artifact:{k}": v for k, v in self.input_artifacts.items()},
            )
            what = "a complete" if previous["status"] == "complete" else "an unfinished"
            differences = "; ".join(changes) or "fingerprint differs"
            raise StageError(
                f"{self.dir} holds {what} `{self.stage}` of a different run ({differences}). "
                "Pass --force to overwrite it, or set `run.dir` to a new folder."
            )
        if self.force or not self.rerun_on_change:
            self._clear_outputs()
        elif previous and previous.get("status") == "complete":
            # A cache-like stage redone for other inputs keeps its outputs until it completes: should this
            # attempt fail, the stage is again what it was (`__exit__`), not a failed or interrupted one.
            self._complete_before = previous
        self._manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "files": self.files,
            "input_artifacts": self.input_artifacts,
            "version": __version__,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "status": "running",
            "started_at": now_iso(),
            "progress": {},
        }
        self._write()

    def _clear_outputs(self) -> None:
        from pipelines.core.failpoints import kill_point

        refuse_while_read(self.dir, self.stage)
        # The stage is marked `clearing` first: a kill in the middle of the clear leaves a stage that reads
        # as unfinished (and whose rerun finishes the clear), never one that says complete over
        # half-deleted outputs, nor outputs without a manifest.
        outputs = stage_outputs(self.dir)
        if outputs or (self.dir / MANIFEST).exists():
            self._manifest = {"stage": self.stage, "status": "clearing", "started_at": now_iso()}
            self._write()
        kill_point(f"clear:{self.stage}:{MANIFEST}")
        for child in outputs:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
            kill_point(f"clear:{self.stage}:{child.name}")

    def update_progress(self, **progress: Any) -> None:
        self._manifest["progress"] = progress
        self._write()

    def complete(self, summary: Mapping[str, Any], outputs: Sequence[str] = ()) -> None:
        """Mark the stage complete; the digests of `outputs` (names in the stage folder) are recorded for
        the stages that read them (`finished_upstream` checks them)."""
        self.summary = dict(summary)
        self._manifest.update(
            status="complete",
            completed_at=now_iso(),
            elapsed_s=round(time.monotonic() - self._started, 3),
            summary=self.summary,
            outputs={name: integrity.tree_digests(self.dir / name) for name in outputs},
        )
        self._write()

    def _write(self) -> None:
        self._manifest["updated_at"] = now_iso()
        atomic_write_json(self.dir / MANIFEST, self._manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and self._manifest.get("status") == "running":
                if self._complete_before is not None:
                    self._manifest = self._complete_before
                    atomic_write_json(self.dir / MANIFEST, self._manifest)
                elif isinstance(exc, CocomixError):
                    self._manifest.update(status="failed", error=str(exc))
                    self._write()
        finally:
            self._lock.release()

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest


def finished_output(run_dir: Path, stage: str, name: str) -> tuple[Path, str] | None:
    """`run_dir/stage/name` and the stage's fingerprint when the stage is complete, else None."""
    manifest = read_json(Path(run_dir) / stage / MANIFEST) or {}
    if manifest.get("status") != "complete":
        return None
    return Path(run_dir) / stage / name, manifest["fingerprint"]


@dataclass(frozen=True)
class Upstream:
    """A finished output another stage reads: its path, its stage's fingerprint and manifest."""

    path: Path
    fingerprint: str
    manifest: dict[str, Any]


@contextlib.contextmanager
def finished_upstream(
    run_dir: Path,
    stage: str,
    name: str,
    *,
    expected: Mapping[str, Any] | None = None,
    missing: str | None = None,
) -> Iterator[Upstream]:
    """Read `run_dir/stage/name` of a complete stage, holding it against writers for the whole block.

    Refuses (`StageError`, exit 2) when the stage is not finished (`missing` says what to run), when it was
    made with settings that differ from `expected` (the config values the stage depends on, as now set),
    or when a file differs from the digest recorded at completion (`InputError`, naming the file).
    """
    stage_dir = Path(run_dir) / stage
    missing = missing or f"{run_dir} has no finished `{stage}`. Run `{stage_command(stage)}` first."
    if not stage_dir.is_dir():
        raise StageError(missing)
    with ReadLock(stage_dir, stage):
        manifest = read_json(stage_dir / MANIFEST) or {}
        if manifest.get("status") != "complete":
            raise StageError(missing)
        _refuse_changed_upstream(run_dir, stage, manifest.get("inputs", {}), expected or {})
        recorded = manifest.get("outputs", {}).get(name)
        if recorded is not None:
            integrity.verify(stage_dir / name, recorded, f"{stage_command(stage)} --force")
        yield Upstream(stage_dir / name, manifest["fingerprint"], manifest)


def refuse_changed_upstream(run_dir: Path, stage: str, expected: Mapping[str, Any]) -> None:
    """Refuse when the last run of `stage` used other values of `expected` than the config has now."""
    manifest = read_json(Path(run_dir) / stage / MANIFEST)
    if manifest is not None:
        _refuse_changed_upstream(run_dir, stage, manifest.get("inputs", {}), expected)


def _refuse_changed_upstream(
    run_dir: Path, stage: str, recorded: Mapping[str, Any], expected: Mapping[str, Any]
) -> None:
    from pipelines.core.stage_inputs import LEFT_OUT_AT_DEFAULT

    recorded = {**LEFT_OUT_AT_DEFAULT, **recorded}  # a key left out was at its default
    changed = [k for k, v in expected.items() if k in recorded and recorded[k] != v]
    if changed:
        what = ", ".join(f"{k} = {shorten(recorded[k])}" for k in changed[:3])
        now = ", ".join(f"{k} = {shorten(expected[k])}" for k in changed[:3])
        raise StageError(
            f"`{stage}` in {run_dir} was made with {what}, but the config now has {now}. Rerun it with "
            f"`{stage_command(stage)} --force` (then the stages after it), or set `run.dir` to a new folder."
        )


def known_files(run_dir: Path, stage: str) -> dict[str, dict[str, Any]]:
    """File identities recorded by the last attempt at `stage`, keyed by path, for `file_identity`."""
    manifest = read_json(Path(run_dir) / stage / MANIFEST) or {}
    return {entry["path"]: entry for entry in manifest.get("files", [])}


ORPHAN_OUTPUTS = "outputs without a manifest"


def stage_outputs(stage_dir: Path) -> list[Path]:
    """What a stage wrote: everything in its folder but the manifest and the lock files."""
    return [
        child
        for child in sorted(Path(stage_dir).iterdir())
        if child.name != MANIFEST
        and not child.name.startswith((LOCK_FILE, READER_PREFIX, UNNAMED_READER_PREFIX))
    ]


def holds_orphan_outputs(stage_dir: Path) -> bool:
    """Files in a stage folder that has no manifest: nothing says whose or how finished they are (a
    manifest's own temporary file, left by a kill while it was written, does not count)."""
    stage_dir = Path(stage_dir)
    return (
        stage_dir.is_dir()
        and not (stage_dir / MANIFEST).exists()
        and any(not p.name.startswith(f".{MANIFEST}.tmp") for p in stage_outputs(stage_dir))
    )


def stage_states(run_dir: Path) -> list[dict[str, Any]]:
    """What `cocomix status` shows: every known stage (and any other stage folder) with its state."""
    run_dir = Path(run_dir)
    names = list(STAGES)
    if run_dir.is_dir():
        names += sorted(
            p.name
            for p in run_dir.iterdir()
            if p.name not in STAGES
            and ((p / MANIFEST).exists() or (p.name.startswith("pretrain-") and holds_orphan_outputs(p)))
        )
    states = []
    for name in names:
        stage_dir = run_dir / name
        manifest = read_json(stage_dir / MANIFEST) if stage_dir.is_dir() else None
        if manifest is None:
            status = ORPHAN_OUTPUTS if holds_orphan_outputs(stage_dir) else "not started"
            states.append({"stage": name, "status": status})
            continue
        status = manifest.get("status", "running")
        if status in ("running", "clearing") and not writer_holders(stage_dir):  # its one writer, or shards
            status = "interrupted"
        progress = dict(manifest.get("progress", {}))
        if (stage_dir / CHUNKS_DIR).is_dir():  # chunked stages: their markers are the progress
            progress["chunks_done"] = sum(1 for _ in (stage_dir / CHUNKS_DIR).glob("*.json"))
        states.append(
            {
                "stage": name,
                "status": status,
                "fingerprint": manifest.get("fingerprint"),
                "progress": progress,
                "updated_at": manifest.get("updated_at"),
                "elapsed_s": manifest.get("elapsed_s"),
                "summary": manifest.get("summary", {}),
                "error": manifest.get("error"),
            }
        )
    return states

"""The run folder on disk: layout, file names, manifests, fingerprints, atomic writes and stage locks.

A run folder holds `run.json` and one subfolder per stage. Each stage folder has a `manifest.json` that says
whether the stage is `running`, `complete` or `failed`, and the fingerprint of exactly the config values and
input files that determine its output. `StageSession` is how every stage starts and ends: it decides
whether the stage is up to date, resumes, starts fresh, or must refuse, and it holds the stage's lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import __version__
from pipelines.errors import CocomixError, StageError

log = logging.getLogger(__name__)

RUN_MARKER = "run.json"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
TOKENS_STORE = "tokens.zarr"
TRAINED_SAE = "sae"  # the SAELens folder inside the train-sae stage
CHUNKS_DIR = "chunks"

# Stages in pipeline order, always listed by `cocomix status`; per-objective stages (`pretrain-ntp`,
# ...) are listed once they exist.
STAGES = ("prepare", "train-sae", "extract-concepts")


# --- small files -----------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that readers see the old or the new content, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- fingerprints ----------------------------------------------------------------------------------------


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of a flat `{key: JSON value}` mapping."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """The sha256 of a file's content, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_identity(path: Path, known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Path, size, mtime and content hash of a file.

    The hash of a file whose size and mtime match an entry in `known` (the last manifest) is reused, as
    git's index does, so an up-to-date check over a large corpus costs a `stat`, not a read.
    """
    path = Path(path).resolve()
    stat = path.stat()
    previous = (known or {}).get(str(path))
    if previous and previous.get("size") == stat.st_size and previous.get("mtime_ns") == stat.st_mtime_ns:
        digest = previous["sha256"]
    else:
        digest = sha256_file(path)
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}


def local_files(*specs: str) -> list[Path]:
    """The files behind local specs (a file, or every visible file under a folder); hub ids have none."""
    files: set[Path] = set()
    for spec in specs:
        path = Path(spec).expanduser() if spec else None
        if path is None or not path.exists():
            continue
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            files.add(path)
    return sorted(files)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human lines `key: old -> new` for every key whose value differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            lines.append(f"{key}: {_short(old.get(key, '<unset>'))} -> {_short(new.get(key, '<unset>'))}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


# --- the run folder --------------------------------------------------------------------------------------


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
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"tool": "cocomix", "created_at": now_iso(), "version": __version__})
    return root


@dataclass
class StageResult:
    """What a stage's `run` returns: where it wrote, whether it had anything to do, and its summary."""

    stage: str
    dir: Path
    up_to_date: bool
    summary: dict[str, Any]
    fingerprint: str


class StageLock:
    """An exclusive `flock` on the stage folder; the kernel drops it if the holder dies, even by SIGKILL."""

    def __init__(self, stage_dir: Path, stage: str, name: str = LOCK_FILE):
        self.path = Path(stage_dir) / name
        self.stage = stage
        self._fh = None

    def acquire(self, wait: bool = False) -> None:
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StageError(
                f"Stage `{self.stage}` is being written by {holder} (lock {self.path}). "
                "Wait for it to finish or stop it, then run again."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def is_held_elsewhere(self) -> bool:
        if not self.path.exists():
            return False
        with open(self.path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False


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
    ):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.dir = self.run_dir / stage
        self.inputs = dict(inputs)
        for identity in files or []:
            self.inputs[f"file:{identity['path']}"] = identity["sha256"]
        self.files = files or []
        self.input_artifacts = dict(input_artifacts or {})
        self.fingerprint = fingerprint(
            {**self.inputs, **{f"artifact:{k}": v for k, v in self.input_artifacts.items()}}
        )
        self.force = force
        self.up_to_date = False
        self.resuming = False
        self.summary: dict[str, Any] = {}
        # Workers (shards, ranks) of one stage run side by side: each holds its own lock, and the manifest
        # is read and written under a short shared `.lock-manifest`.
        self.worker = worker
        self._lock = StageLock(self.dir, stage, f"{LOCK_FILE}-{worker}" if worker else LOCK_FILE)
        self._manifest: dict[str, Any] = {}
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
        lock = StageLock(self.dir, self.stage, f"{LOCK_FILE}-manifest")
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
        if previous and previous.get("fingerprint") == self.fingerprint and not self.force:
            if previous.get("status") == "complete":
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
        if previous and previous.get("status") in ("complete", "running") and not self.force:
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
        self._clear_outputs()
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
        from pipelines.failpoints import kill_point

        # The manifest goes first: a kill in the middle of the clear leaves a stage that reads as not
        # started (and starts afresh), never one that says complete over half-deleted outputs.
        (self.dir / MANIFEST).unlink(missing_ok=True)
        kill_point(f"clear:{self.stage}:{MANIFEST}")
        for child in sorted(self.dir.iterdir()):
            if child.name.startswith(LOCK_FILE):
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
            kill_point(f"clear:{self.stage}:{child.name}")

    def update_progress(self, **progress: Any) -> None:
        self._manifest["progress"] = progress
        self._write()

    def complete(self, summary: Mapping[str, Any]) -> None:
        self.summary = dict(summary)
        self._manifest.update(
            status="complete",
            completed_at=now_iso(),
            elapsed_s=round(time.monotonic() - self._started, 3),
            summary=self.summary,
        )
        self._write()

    def _write(self) -> None:
        self._manifest["updated_at"] = now_iso()
        atomic_write_json(self.dir / MANIFEST, self._manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if (
                exc is not None
                and self._manifest.get("status") == "running"
                and isinstance(exc, CocomixError)
            ):
                self._manifest.update(status="failed", error=str(exc))
                self._write()
        finally:
            self._lock.release()

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest


def _any_lock_held(stage_dir: Path, stage: str) -> bool:
    """A stage is being written while any of its writers (one, or one per shard or rank) holds its lock."""
    names = [p.name for p in stage_dir.glob(f"{LOCK_FILE}*") if p.name != f"{LOCK_FILE}-manifest"]
    return any(StageLock(stage_dir, stage, name).is_held_elsewhere() for name in names)


def finished_output(run_dir: Path, stage: str, name: str) -> tuple[Path, str] | None:
    """`run_dir/stage/name` and the stage's fingerprint when the stage is complete, else None."""
    manifest = read_json(Path(run_dir) / stage / MANIFEST) or {}
    if manifest.get("status") != "complete":
        return None
    return Path(run_dir) / stage / name, manifest["fingerprint"]


def known_files(run_dir: Path, stage: str) -> dict[str, dict[str, Any]]:
    """File identities recorded by the last attempt at `stage`, keyed by path, for `file_identity`."""
    manifest = read_json(Path(run_dir) / stage / MANIFEST) or {}
    return {entry["path"]: entry for entry in manifest.get("files", [])}


def stage_states(run_dir: Path) -> list[dict[str, Any]]:
    """What `cocomix status` shows: every known stage (and any other stage folder) with its state."""
    run_dir = Path(run_dir)
    names = list(STAGES)
    if run_dir.is_dir():
        names += sorted(p.name for p in run_dir.iterdir() if (p / MANIFEST).exists() and p.name not in STAGES)
    states = []
    for name in names:
        stage_dir = run_dir / name
        manifest = read_json(stage_dir / MANIFEST) if stage_dir.is_dir() else None
        if manifest is None:
            states.append({"stage": name, "status": "not started"})
            continue
        status = manifest.get("status", "running")
        if status == "running" and not _any_lock_held(stage_dir, name):
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


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop rows of a metrics file logged after `step` (a resumed run logs them again)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(row + "\n" for row in rows).encode())

"""The run folder on disk: layout, file names, manifests, fingerprints, atomic writes and stage locks.

A run folder holds `run.json` and one subfolder per stage. Each stage folder has a `manifest.json` that says
whether the stage is `running`, `complete` or `failed`, and the fingerprint of exactly the config values and
input files that determine its output. `StageSession` is how every stage starts and ends: it decides
whether the stage is up to date, resumes, starts fresh, or must refuse, and it holds the stage's lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import __version__, integrity
from pipelines.errors import CocomixError, StageError
from pipelines.integrity import sha256_file
from pipelines.locks import (
    LOCK_FILE,
    MANIFEST_LOCK,
    READER_PREFIX,
    ReadLock,
    StageLock,
    refuse_while_read,
    writer_holders,
)

log = logging.getLogger(__name__)

RUN_MARKER = "run.json"
MANIFEST = "manifest.json"
# Stage folders and the outputs other stages read from them: named here once.
PREPARE_STAGE, TRAIN_SAE_STAGE, EXTRACT_STAGE = "prepare", "train-sae", "extract-concepts"
TOKENS_STORE = "tokens.zarr"  # in prepare/
TRAINED_SAE = "sae"  # the SAELens folder in train-sae/
CONCEPTS_STORE = "concepts.zarr"  # in extract-concepts/
FINAL_MODEL = "model"  # in each pretrain-OBJECTIVE/
EVAL_STAGE = "eval"
EVAL_RESULTS = {"cocomix": "results.json", "lm-eval": "results-lm-eval.json"}  # in eval/, per backend
CHUNKS_DIR = "chunks"

# Stages in pipeline order, always listed by `cocomix status`; per-objective stages (`pretrain-ntp`,
# ...) are listed once they exist.
STAGES = (PREPARE_STAGE, TRAIN_SAE_STAGE, EXTRACT_STAGE)


def eval_results_path(run_dir: Path | str, backend: str) -> Path:
    """Where an eval backend writes its results (each backend keeps its own file)."""
    return Path(run_dir) / EVAL_STAGE / EVAL_RESULTS[backend]


def pretrain_stage(objective: str, online_teacher: bool = False) -> str:
    """The folder of one student: `pretrain-cocomix`, `pretrain-cocomix-online`, ..."""
    return f"pretrain-{objective}" + ("-online" if online_teacher else "")


# --- small files -----------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that readers see the old or the new content, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leave half a file behind
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, with a full disk raised as the `OSError` it is.

    safetensors reports I/O failures as its own `SafetensorError`; as an `OSError(ENOSPC)` the CLI tells the
    user the disk is full and how to continue, instead of printing a traceback.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        if "os error 28" in str(exc) or "No space left" in str(exc):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError):  # the latter: a parent (say `run.dir`) is a file
        return None


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- fingerprints ----------------------------------------------------------------------------------------


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of a flat `{key: JSON value}` mapping."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_identity(
    path: Path, known: Mapping[str, Mapping[str, Any]] | None = None, name: str | None = None
) -> dict[str, Any]:
    """Path, size, mtime and content hash of a file, and the `name` it has in a fingerprint.

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
    identity = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return {**identity, "name": name or path.name}


def input_files(
    roles: Mapping[str, Sequence[Path] | str], known: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Identities of a stage's input files, named by role and by place below their common folder.

    `roles` maps a setting (`data.source`) to its files or to a spec (a file, a folder, or a hub id with no
    local files). Fingerprints use these names, never absolute paths: the same files elsewhere (a moved
    corpus, another copy of a tokenizer, a run folder copied to another machine) give the same fingerprint.
    """
    identities = []
    for role, files in roles.items():
        paths = local_files(files) if isinstance(files, str) else sorted(Path(f) for f in files)
        if not paths:
            continue
        resolved = [p.resolve() for p in paths]
        root = Path(os.path.commonpath([p.parent for p in resolved]))
        for path in resolved:
            identities.append(file_identity(path, known, f"{role}/{path.relative_to(root).as_posix()}"))
    return identities


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


@dataclass
class StageResult:
    """What a stage's `run` returns: where it wrote, whether it had anything to do, and its summary."""

    stage: str
    dir: Path
    up_to_date: bool
    summary: dict[str, Any]
    fingerprint: str


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
            self.inputs[f"file:{identity.get('name', identity['path'])}"] = identity["sha256"]
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
        if previous is None and holds_orphan_outputs(self.dir) and not self.force:
            raise StageError(
                f"{self.dir} holds outputs but no {MANIFEST}, so nothing says which run they belong to or "
                "whether they are finished. Pass --force to delete them and run the stage again, or set "
                "`run.dir` to a new folder."
            )
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


def finished_output(run_dir: Path, stage: str, name: str) -> tuple[Path, str] | None:
    """`run_dir/stage/name` and the stage's fingerprint when the stage is complete, else None."""
    manifest = read_json(Path(run_dir) / stage / MANIFEST) or {}
    if manifest.get("status") != "complete":
        return None
    return Path(run_dir) / stage / name, manifest["fingerprint"]


def stage_command(stage: str) -> str:
    """The command that (re)makes a stage folder: `pretrain-kd` is `cocomix pretrain --objective kd`."""
    if stage.startswith("pretrain-"):
        objective, _, online = stage.removeprefix("pretrain-").partition("-")
        return f"cocomix pretrain --objective {objective}" + (" --online-teacher" if online else "")
    return f"cocomix {stage}"


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
    changed = [k for k, v in expected.items() if k in recorded and recorded[k] != v]
    if changed:
        what = ", ".join(f"{k} = {_short(recorded[k])}" for k in changed[:3])
        now = ", ".join(f"{k} = {_short(expected[k])}" for k in changed[:3])
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
        if child.name != MANIFEST and not child.name.startswith((LOCK_FILE, READER_PREFIX))
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


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop rows of a metrics file logged after `step` (a resumed run logs them again).

    A last line cut short by a kill is dropped with them; a damaged line before it is an error, since
    dropping it would lose a row that the resumed run does not log again.
    """
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise StageError(
                f"{path}:{number} is not a JSON row. Delete that line (the run logs every step after "
                f"{step} again), then resume."
            ) from None
        if row["step"] <= step:
            rows.append(line)
    atomic_write_bytes(path, "".join(row + "\n" for row in rows).encode())

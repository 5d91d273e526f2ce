"""Small files written whole: atomic writes (readers see the old or the new content, never a torn file),
JSON and JSON-lines, safetensors with a full disk reported as one.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from pathlib import Path
from typing import Any

from pipelines.errors import StageError


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

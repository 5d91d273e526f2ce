"""Fingerprints: the short hash of exactly the config values and input files that determine a stage's
output, with input files named by role and by content, never by absolute path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.core.integrity import sha256_file


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
            lines.append(f"{key}: {shorten(old.get(key, '<unset>'))} -> {shorten(new.get(key, '<unset>'))}")
    return lines


def shorten(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


LOCAL_FILES = "<local files, by content>"


def fingerprint_fields(section: Any, prefix: str) -> dict[str, Any]:
    """The fields of one section that determine a stage's output, keyed `prefix.name`.

    A setting that names local files stands for their content, which the stage fingerprints by hash: the
    path itself is left out, so a moved corpus or a run folder copied elsewhere keeps its fingerprints.
    """
    return {
        f"{prefix}.{f.name}": fingerprint_path(value) if f.metadata.get("local_path") else value
        for f in dataclasses.fields(section)
        if f.metadata.get("affects_output", True)
        for value in [getattr(section, f.name)]
    }


def fingerprint_path(value: str) -> str:
    """`value` as a fingerprint holds it: hub ids as written, local files as `LOCAL_FILES`.

    A `pypi:` spec is local files too (those of the package, fetched into the asset cache), so a spec and
    the path it resolves to, wherever the cache lies, fingerprint alike.
    """
    import glob

    expanded = os.path.expanduser(value) if value else ""
    if value.startswith("pypi:") or expanded and (os.path.exists(expanded) or glob.glob(expanded)):
        return LOCAL_FILES
    return value

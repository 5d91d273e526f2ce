"""Objectives from the user's own files: each file of `pretrain.plugins` is imported (once per process and
content) by the config loader, so every command, every torchrun rank and every slurm job that reads the
config declares the same objectives without a fork of cocomix or an installed package.

A file registers its objectives with `register_objective(ObjectiveSpec(...))`; they carry the file's path
(`ObjectiveSpec.source`), so errors name it and the fingerprint of their students holds its content hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

from pipelines.errors import ConfigError, first_line
from pipelines.objectives.declaration import declaring, unregister_source

_loaded: dict[Path, str] = {}  # each plugin file imported in this process -> its content hash then


def load_plugins(paths: Iterable[str], where: str) -> None:
    """Import each plugin file not yet imported with its current content; `where` is the config's place
    that named them (a file, a `--set`), for the error line."""
    for path in paths:
        _load(Path(path).expanduser(), where)


def _load(path: Path, where: str) -> None:
    resolved = path.resolve()
    if not resolved.is_file():
        raise ConfigError(f"{where}: `pretrain.plugins` names {path}, which is not a file.")
    digest = plugin_digest(str(resolved))
    if _loaded.get(resolved) == digest:
        return
    unregister_source(str(resolved))  # an edited file declares its objectives again
    name = "cocomix_plugin_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: a plugin is a Python file (`.py`), which this is not.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its `module:Class` names and dataclasses resolve through it
    with declaring(str(resolved)):
        try:
            spec.loader.exec_module(module)
        except ConfigError as exc:
            unregister_source(str(resolved))
            raise ConfigError(f"{path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any error of the user's file is reported as theirs
            unregister_source(str(resolved))
            raise ConfigError(
                f"{path}: the plugin failed to import ({type(exc).__name__}: {first_line(exc)}). Run "
                f"`python {path}` to see the traceback."
            ) from None
    _loaded[resolved] = digest


def plugin_digest(source: str) -> str:
    """The content hash of a plugin file, as its objectives' students fingerprint it (a small file: read
    whole; `core.integrity` is a layer above the config's)."""
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()

"""Reading a config: defaults < the TOML file < `--set section.key=value` < a command's own flags, each value
checked against its field's type and range, every problem reported at once under the place it came from.

One value is read by `pipelines.config.values`, the tables that are not sections (profiles, variants, custom
tasks) by `pipelines.config.tables`, and the whole by `pipelines.config.checks`; this module orders them
and reads paths written in a file next to the file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from pipelines.config.checks import raise_problems
from pipelines.config.schema import DEFAULT_CONFIG_FILE, PATH, SECTIONS, Config
from pipelines.config.tables import (
    PROFILES,
    apply_profile,
    chosen_profile,
    read_custom_tasks,
    read_profiles,
    read_variants,
)
from pipelines.config.values import check_type, did_you_mean, lookup, parse_override, split_override
from pipelines.errors import ConfigError
from pipelines.objectives.plugins import load_plugins


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the config: defaults, then the TOML file, then `--set` strings, then typed command flags.

    `path=None` reads `cocomix.toml` from the working directory when it exists and uses defaults otherwise.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    profiles: dict[str, dict[str, Any]] = {}
    _load_plugins_of_overrides(overrides)  # before any value is read: plugins declare keys of their own
    file_label = _read_file(path, values, profiles)
    # Where each value that is not a default came from, later sources replacing earlier ones, so that a
    # range error names the `--set` or flag that set the value rather than the file.
    sources = {f"{section}.{name}": file_label for section, table in values.items() for name in table}
    apply_profile(chosen_profile(values, overrides, flags), profiles, values, sources, file_label)
    if file_label != "defaults":
        _read_paths_next_to_the_file(values, Path(file_label).parent)
    for item in overrides:
        key, raw = split_override(item)
        section, name, ftype = lookup(key, where=f"--set {item}")
        values[section][name] = check_type(parse_override(raw, ftype), ftype, f"--set {item}", key)
        sources[f"{section}.{name}"] = f"--set {item}"
    for key, value in (flags or {}).items():
        if value is None:
            continue
        section, name, ftype = lookup(key, where="command flag")
        values[section][name] = check_type(value, ftype, f"flag for {key}", key)
        sources[f"{section}.{name}"] = f"flag for {key}"
    _gather_objective_settings(values["pretrain"])
    cfg = Config(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    raise_problems(cfg, sources, file_label)
    return cfg


def _read_file(
    path: str | Path | None, values: dict[str, dict[str, Any]], profiles: dict[str, dict[str, Any]]
) -> str:
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).is_file():
            return "defaults"
        path = DEFAULT_CONFIG_FILE
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file `{path}` not found. Pass `--config PATH` to an existing file.")
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    profiles.update(read_profiles(document.pop(PROFILES, {}), str(path)))
    plugins = (
        document.get("pretrain", {}).get("plugins") if isinstance(document.get("pretrain"), dict) else None
    )
    if plugins is not None:
        plugins = check_type(plugins, list[str], str(path), "pretrain.plugins")
        load_plugins([_next_to(path.parent, plugin, PATH) for plugin in plugins], str(path))
    for section, table in document.items():
        if section not in SECTIONS:
            hint = did_you_mean(section, SECTIONS, "section")
            raise ConfigError(f"{path}: unknown section `[{section}]`{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: `{section}` must be a table `[{section}]`, not a single value.")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key == "eval.task":
                values[section][name] = read_custom_tasks(value, str(path))
                continue
            if key == "run.variants":
                values[section][name] = read_variants(value, str(path))
                continue
            _, _, ftype = lookup(key, where=str(path))
            values[section][name] = check_type(value, ftype, str(path), key)
    return str(path)


def _load_plugins_of_overrides(overrides: Iterable[str]) -> None:
    for item in overrides:
        key, raw = split_override(item)
        if key == "pretrain.plugins":
            plugins = check_type(parse_override(raw, list[str]), list[str], f"--set {item}", key)
            load_plugins(plugins, f"--set {item}")


def _gather_objective_settings(pretrain: dict[str, Any]) -> None:
    """Move the keys that objectives declare (`lookup` accepted them) into `objective_settings`."""
    fields = {f.name for f in dataclasses.fields(SECTIONS["pretrain"])}
    declared = {key: pretrain.pop(key) for key in [key for key in pretrain if key not in fields]}
    if declared:
        pretrain["objective_settings"] = declared


def _read_paths_next_to_the_file(values: dict[str, dict[str, Any]], folder: Path) -> None:
    """Relative paths in a config file are relative to its folder, so `cocomix -c exp/cocomix.toml` reads
    the same files from any working directory. Values from `--set` and flags stay relative to the working
    directory, as paths on a command line are."""
    if folder.resolve() == Path.cwd().resolve():
        return  # the common case: nothing to rebase, and messages keep the paths as written
    kinds = {
        section: {f.name: f.metadata.get("relative", "") for f in dataclasses.fields(cls)}
        for section, cls in SECTIONS.items()
    }
    for section, table in values.items():
        for name, value in table.items():
            kind = kinds[section].get(name, "")
            if (section, name) == ("eval", "task"):
                table[name] = {
                    task: dataclasses.replace(spec, data=_next_to(folder, spec.data, PATH))
                    for task, spec in value.items()
                }
            elif (section, name) == ("eval", "data"):
                table[name] = [_task_path_next_to(folder, item) for item in value]
            elif (section, name) == ("eval", "tasks"):  # `ppl:PATH` names a file like any path setting
                table[name] = [_text_task_next_to(folder, item) for item in value]
            elif kind and isinstance(value, list):
                table[name] = [_next_to(folder, item, kind) for item in value]
            elif kind:
                table[name] = _next_to(folder, value, kind)


def _next_to(folder: Path, value: str, kind: str) -> str:
    import glob

    if not value or value.startswith(("hf:", "pypi:", "~")) or os.path.isabs(value):
        return value
    candidate = os.path.normpath(os.path.join(folder, value))
    if kind == PATH or os.path.exists(candidate) or glob.glob(candidate):
        return candidate
    return value  # a hub id, or a path that exists nowhere (its error names it as written)


def _task_path_next_to(folder: Path, item: str) -> str:
    task, sep, path = item.partition("=")
    return f"{task}={_next_to(folder, path, PATH)}" if sep else item


def _text_task_next_to(folder: Path, task: str) -> str:
    prefix = "ppl:"
    return prefix + _next_to(folder, task[len(prefix) :], PATH) if task.startswith(prefix) else task

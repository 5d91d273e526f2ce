"""Reading one config value: which field a `section.key` names, a `--set` string parsed by the field's type,
and a value checked against that type (ranges and relations are `pipelines.config.checks`)."""

from __future__ import annotations

import difflib
import sys
import typing
from collections.abc import Iterable
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from pipelines.config.schema import SECTIONS
from pipelines.errors import ConfigError


def lookup(key: str, where: str) -> tuple[str, str, Any]:
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        hint = did_you_mean(section, SECTIONS, "section")
        raise ConfigError(f"{where}: unknown section `{section}` in `{key}`{hint}")
    hints = typing.get_type_hints(SECTIONS[section])
    hints.pop("objective_settings", None)  # filled from the keys objectives declare, never set by name
    if section == "pretrain" and name not in hints:
        from pipelines.objectives.declaration import declared_setting

        declared = declared_setting(name)
        if declared is not None:
            return section, name, type(declared[1].default)
    if not name or name not in hints:
        names = [f"{section}.{n}" for n in hints]
        if not names:
            raise ConfigError(f"{where}: unknown key `{key}`; section `[{section}]` has no keys yet.")
        raise ConfigError(f"{where}: unknown key `{key}`{did_you_mean(key, names, 'key')}")
    return section, name, hints[name]


def did_you_mean(word: str, choices: Iterable[str], what: str) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; valid {what}s: {', '.join(f'`{c}`' for c in choices)}."


def split_override(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected `section.key=value`, e.g. `--set data.block_size=256`.")
    return key.strip(), raw.strip()


def parse_override(raw: str, ftype: Any) -> Any:
    if base_type(ftype) is str:
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return raw[1:-1]
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if typing.get_origin(ftype) is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        return raw  # check_type reports the mismatch with the field's type


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def base_type(ftype: Any) -> Any:
    """The plain type a value must have: a `Literal`'s is its choices' (`str` for all of today's)."""
    if typing.get_origin(ftype) is typing.Literal:
        (base,) = {type(choice) for choice in typing.get_args(ftype)}
        return base
    return ftype


def check_type(value: Any, ftype: Any, where: str, key: str) -> Any:
    """`value` if it has the field's type (an int widened to a float); `_validate` checks its choices."""
    if typing.get_origin(ftype) is dict:
        raise ConfigError(f"{where}: `{key}` is a table; declare it in the config file (`[{key}.NAME]`).")
    if typing.get_origin(ftype) is list:
        (item_type,) = typing.get_args(ftype)
        if not isinstance(value, list):
            kind = TYPE_NAMES[base_type(item_type)][2:]
            raise ConfigError(f"{where}: `{key}` must be a list of {kind}s, got {value!r}.")
        return [check_type(item, item_type, where, key) for item in value]
    ftype = base_type(ftype)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[ftype]
    if not ok:
        raise ConfigError(f"{where}: `{key}` must be {TYPE_NAMES[ftype]}, got {value!r}.")
    return float(value) if ftype is float else value

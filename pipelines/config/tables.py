"""The config file's tables that are not sections: `[profiles.NAME]` (chosen by `run.profile`),
`[run.variants.NAME]` and `[eval.task.NAME]`, each entry checked as a `--set` of its keys is."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.config.schema import SECTIONS, CustomTaskConfig, field_choices, spell_choices
from pipelines.config.values import check_type, did_you_mean, lookup, split_override
from pipelines.errors import ConfigError

PROFILES = "profiles"  # the config file's `[profiles.NAME]` tables, chosen by `run.profile`


def _require_tables(tables: Any, message: str) -> None:
    """`[NAME.KEY]` tables, each a table itself: anything else in their place is `message`."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(message)


def read_profiles(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    """`[profiles.NAME]` tables of `section.key` values (quoted or as TOML dotted keys), each checked like a
    `--set`."""
    _require_tables(
        tables,
        f"{where}: profiles are tables `[profiles.NAME]` of `section.key = value` settings, e.g. "
        '`[profiles.imdb]` holding `data.source = "stanfordnlp/imdb"`.',
    )
    profiles = {}
    for name, table in tables.items():
        label = f"`[profiles.{name}]`"
        flat = {}
        for key, value in table.items():  # `data.source = ...` is the nested table {"data": {"source": ...}}
            nested = isinstance(value, dict) and key in SECTIONS
            flat.update({f"{key}.{k}": v for k, v in value.items()} if nested else {key: value})
        resolved = {}
        for key, value in flat.items():
            if key in ("run.profile", "run.variants", "eval.task"):
                raise ConfigError(
                    f"{where}: {label} sets `{key}`; a profile sets plain `section.key` values (declare "
                    "variants and custom tasks in their own tables)."
                )
            _, _, ftype = lookup(key, where=f"{where}: {label}")
            resolved[key] = check_type(value, ftype, f"{where}: {label}", key)
        profiles[name] = resolved
    return profiles


def chosen_profile(
    values: dict[str, dict[str, Any]], overrides: Iterable[str], flags: Mapping[str, Any] | None
) -> tuple[str, str]:
    """(the profile `run.profile` names, where it was named): the last `--set` or flag wins over the file."""
    chosen = (values["run"].get("profile", ""), "")
    for item in overrides:
        key, raw = split_override(item)
        if key == "run.profile":
            chosen = (raw, f"--set {item}")
    if (flags or {}).get("run.profile") is not None:
        chosen = (flags["run.profile"], "flag for run.profile")
    return chosen


def apply_profile(
    chosen: tuple[str, str],
    profiles: dict[str, dict[str, Any]],
    values: dict[str, dict[str, Any]],
    sources: dict[str, str],
    file_label: str,
) -> None:
    name, where = chosen
    if not name:
        return
    if name not in profiles:
        declared = f"declares {', '.join(f'`{p}`' for p in profiles)}" if profiles else "declares none"
        raise ConfigError(
            f"{where or file_label}: `run.profile` {name!r} is not a `[profiles.NAME]` table of the config "
            f"file ({file_label} {declared})."
        )
    for key, value in profiles[name].items():
        section, field_name = key.split(".", 1)
        values[section][field_name] = value
        sources[key] = f"{file_label} [profiles.{name}]"


def read_custom_tasks(tables: Any, where: str) -> dict[str, CustomTaskConfig]:
    _require_tables(
        tables, f"{where}: custom tasks are tables `[eval.task.NAME]` with data, prompt, choices, gold."
    )
    tasks = {}
    names = [f.name for f in dataclasses.fields(CustomTaskConfig)]
    hints = typing.get_type_hints(CustomTaskConfig)
    for task, table in tables.items():
        for key, value in table.items():
            if key not in names:
                hint = did_you_mean(key, names, "key")
                raise ConfigError(f"{where}: unknown key `{key}` in `[eval.task.{task}]`{hint}")
            check_type(value, hints[key], where, f"eval.task.{task}.{key}")
        missing = [k for k in ("data", "prompt", "choices", "gold") if not table.get(k)]
        if missing:
            raise ConfigError(f"{where}: `[eval.task.{task}]` needs {', '.join(missing)}.")
        tasks[task] = CustomTaskConfig(**table)
    return tasks


def read_variants(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    """`[run.variants.NAME]` tables: an objective and `pretrain.*` overrides, each checked like a `--set`."""
    from pipelines.config.students import RESERVED_KEYS, VARIANT_NAME
    from pipelines.objectives.declaration import key_readers, objective_names

    objectives = objective_names()

    _require_tables(
        tables,
        f"{where}: variants are tables `[run.variants.NAME]` holding an `objective` and `pretrain.*` "
        'overrides, e.g. `cocomix_add = { objective = "cocomix", "pretrain.mixing" = "add" }`.',
    )
    variants = {}
    for name, table in tables.items():
        label = f"`run.variants.{name}`"
        if not VARIANT_NAME.match(name) or name in objectives:
            raise ConfigError(
                f"{where}: {label}: a variant name is lowercase letters, digits and `_`, starting with a "
                f"letter, and not an objective's name ({', '.join(objectives)})."
            )
        if table.get("objective") not in objectives:
            raise ConfigError(
                f"{where}: {label} needs `objective` = {spell_choices(objectives)}, got "
                f"{table.get('objective')!r}."
            )
        resolved: dict[str, Any] = {"objective": table["objective"]}
        for key, value in table.items():
            if key == "objective":
                continue
            if not key.startswith("pretrain.") or key in RESERVED_KEYS:
                raise ConfigError(
                    f"{where}: {label} sets `{key}`; a variant overrides `pretrain.*` keys only (not "
                    f"{', '.join(f'`{k}`' for k in RESERVED_KEYS)}): every student of a run shares its "
                    "prepare, SAE and extraction. For targets chosen by SAE activation set "
                    '`"pretrain.concept_targets" = "activation"`; for other upstream settings use another '
                    "`run.dir`."
                )
            _, field_name, ftype = lookup(key, where=f"{where}: {label}")
            readers = key_readers().get(field_name, (table["objective"],))
            if table["objective"] not in readers:
                raise ConfigError(
                    f"{where}: {label} sets `{key}`, which objective `{table['objective']}` does not read "
                    f"(only {', '.join(f'`{o}`' for o in readers)})."
                )
            checked = check_type(value, ftype, f"{where}: {label}", key)
            choices = field_choices(ftype)
            if choices and checked not in choices:
                raise ConfigError(
                    f"{where}: {label}: `{key}` ({checked!r}) must be {spell_choices(choices)}."
                )
            resolved[key] = checked
        variants[name] = resolved
    return variants

"""Reading a config: defaults < the TOML file < `--set section.key=value` < a command's own flags, each value
checked against its field's type and range, every problem reported at once under the place it came from.

A field typed `Literal[...]` (or `list[Literal[...]]`) in `pipelines.config.schema` is checked against its
choices here, generically; the `_validate*` functions check only ranges and relations between fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from pipelines.config.schema import (
    DEFAULT_CONFIG_FILE,
    OBJECTIVES,
    PATH,
    SECTIONS,
    Config,
    CustomTaskConfig,
    field_choices,
    spell_choices,
)
from pipelines.errors import ConfigError


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
    file_label = _read_file(path, values, profiles)
    # Where each value that is not a default came from, later sources replacing earlier ones, so that a
    # range error names the `--set` or flag that set the value rather than the file.
    sources = {f"{section}.{name}": file_label for section, table in values.items() for name in table}
    _apply_profile(_chosen_profile(values, overrides, flags), profiles, values, sources, file_label)
    if file_label != "defaults":
        _read_paths_next_to_the_file(values, Path(file_label).parent)
    for item in overrides:
        key, raw = _split_override(item)
        section, name, ftype = _lookup(key, where=f"--set {item}")
        values[section][name] = _check_type(_parse_override(raw, ftype), ftype, f"--set {item}", key)
        sources[f"{section}.{name}"] = f"--set {item}"
    for key, value in (flags or {}).items():
        if value is None:
            continue
        section, name, ftype = _lookup(key, where="command flag")
        values[section][name] = _check_type(value, ftype, f"flag for {key}", key)
        sources[f"{section}.{name}"] = f"flag for {key}"
    cfg = Config(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    _validate(cfg, sources, file_label)
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
    profiles.update(_profiles(document.pop(PROFILES, {}), str(path)))
    for section, table in document.items():
        if section not in SECTIONS:
            hint = _did_you_mean(section, SECTIONS, "section")
            raise ConfigError(f"{path}: unknown section `[{section}]`{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: `{section}` must be a table `[{section}]`, not a single value.")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key == "eval.task":
                values[section][name] = _custom_tasks(value, str(path))
                continue
            if key == "run.variants":
                values[section][name] = _variants(value, str(path))
                continue
            _, _, ftype = _lookup(key, where=str(path))
            values[section][name] = _check_type(value, ftype, str(path), key)
    return str(path)


PROFILES = "profiles"  # the config file's `[profiles.NAME]` tables, chosen by `run.profile`


def _require_tables(tables: Any, message: str) -> None:
    """`[NAME.KEY]` tables, each a table itself: anything else in their place is `message`."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(message)


def _profiles(tables: Any, where: str) -> dict[str, dict[str, Any]]:
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
            _, _, ftype = _lookup(key, where=f"{where}: {label}")
            resolved[key] = _check_type(value, ftype, f"{where}: {label}", key)
        profiles[name] = resolved
    return profiles


def _chosen_profile(
    values: dict[str, dict[str, Any]], overrides: Iterable[str], flags: Mapping[str, Any] | None
) -> tuple[str, str]:
    """(the profile `run.profile` names, where it was named): the last `--set` or flag wins over the file."""
    chosen = (values["run"].get("profile", ""), "")
    for item in overrides:
        key, raw = _split_override(item)
        if key == "run.profile":
            chosen = (raw, f"--set {item}")
    if (flags or {}).get("run.profile") is not None:
        chosen = (flags["run.profile"], "flag for run.profile")
    return chosen


def _apply_profile(
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


def _custom_tasks(tables: Any, where: str) -> dict[str, CustomTaskConfig]:
    _require_tables(
        tables, f"{where}: custom tasks are tables `[eval.task.NAME]` with data, prompt, choices, gold."
    )
    tasks = {}
    names = [f.name for f in dataclasses.fields(CustomTaskConfig)]
    hints = typing.get_type_hints(CustomTaskConfig)
    for task, table in tables.items():
        for key, value in table.items():
            if key not in names:
                hint = _did_you_mean(key, names, "key")
                raise ConfigError(f"{where}: unknown key `{key}` in `[eval.task.{task}]`{hint}")
            _check_type(value, hints[key], where, f"eval.task.{task}.{key}")
        missing = [k for k in ("data", "prompt", "choices", "gold") if not table.get(k)]
        if missing:
            raise ConfigError(f"{where}: `[eval.task.{task}]` needs {', '.join(missing)}.")
        tasks[task] = CustomTaskConfig(**table)
    return tasks


def _variants(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    """`[run.variants.NAME]` tables: an objective and `pretrain.*` overrides, each checked like a `--set`."""
    from pipelines.config.students import OBJECTIVE_KEYS, RESERVED_KEYS, VARIANT_NAME

    _require_tables(
        tables,
        f"{where}: variants are tables `[run.variants.NAME]` holding an `objective` and `pretrain.*` "
        'overrides, e.g. `cocomix_add = { objective = "cocomix", "pretrain.mixing" = "add" }`.',
    )
    variants = {}
    for name, table in tables.items():
        label = f"`run.variants.{name}`"
        if not VARIANT_NAME.match(name) or name in OBJECTIVES:
            raise ConfigError(
                f"{where}: {label}: a variant name is lowercase letters, digits and `_`, starting with a "
                f"letter, and not an objective's name ({', '.join(OBJECTIVES)})."
            )
        if table.get("objective") not in OBJECTIVES:
            raise ConfigError(
                f"{where}: {label} needs `objective` = {spell_choices(OBJECTIVES)}, got "
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
            _, field_name, ftype = _lookup(key, where=f"{where}: {label}")
            readers = OBJECTIVE_KEYS.get(field_name, (table["objective"],))
            if table["objective"] not in readers:
                raise ConfigError(
                    f"{where}: {label} sets `{key}`, which objective `{table['objective']}` does not read "
                    f"(only {', '.join(f'`{o}`' for o in readers)})."
                )
            checked = _check_type(value, ftype, f"{where}: {label}", key)
            choices = field_choices(ftype)
            if choices and checked not in choices:
                raise ConfigError(
                    f"{where}: {label}: `{key}` ({checked!r}) must be {spell_choices(choices)}."
                )
            resolved[key] = checked
        variants[name] = resolved
    return variants


def _lookup(key: str, where: str) -> tuple[str, str, Any]:
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        hint = _did_you_mean(section, SECTIONS, "section")
        raise ConfigError(f"{where}: unknown section `{section}` in `{key}`{hint}")
    hints = typing.get_type_hints(SECTIONS[section])
    if not name or name not in hints:
        names = [f"{section}.{n}" for n in hints]
        if not names:
            raise ConfigError(f"{where}: unknown key `{key}`; section `[{section}]` has no keys yet.")
        raise ConfigError(f"{where}: unknown key `{key}`{_did_you_mean(key, names, 'key')}")
    return section, name, hints[name]


def _did_you_mean(word: str, choices: Iterable[str], what: str) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; valid {what}s: {', '.join(f'`{c}`' for c in choices)}."


def _split_override(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected `section.key=value`, e.g. `--set data.block_size=256`.")
    return key.strip(), raw.strip()


def _parse_override(raw: str, ftype: Any) -> Any:
    if _base_type(ftype) is str:
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return raw[1:-1]
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if typing.get_origin(ftype) is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        return raw  # _check_type reports the mismatch with the field's type


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _base_type(ftype: Any) -> Any:
    """The plain type a value must have: a `Literal`'s is its choices' (`str` for all of today's)."""
    if typing.get_origin(ftype) is typing.Literal:
        (base,) = {type(choice) for choice in typing.get_args(ftype)}
        return base
    return ftype


def _check_type(value: Any, ftype: Any, where: str, key: str) -> Any:
    """`value` if it has the field's type (an int widened to a float); `_validate` checks its choices."""
    if typing.get_origin(ftype) is dict:
        raise ConfigError(f"{where}: `{key}` is a table; declare it in the config file (`[{key}.NAME]`).")
    if typing.get_origin(ftype) is list:
        (item_type,) = typing.get_args(ftype)
        if not isinstance(value, list):
            kind = _TYPE_NAMES[_base_type(item_type)][2:]
            raise ConfigError(f"{where}: `{key}` must be a list of {kind}s, got {value!r}.")
        return [_check_type(item, item_type, where, key) for item in value]
    ftype = _base_type(ftype)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[ftype]
    if not ok:
        raise ConfigError(f"{where}: `{key}` must be {_TYPE_NAMES[ftype]}, got {value!r}.")
    return float(value) if ftype is float else value


def _validate(cfg: Config, sources: Mapping[str, str], file_label: str) -> None:
    """Gather every out-of-range value and raise once, so one edit fixes them all.

    Each problem is reported under where its value came from (`sources`: the file, a `--set`, a command
    flag); a problem naming keys from several places goes under the latest of them (flag > --set > file).
    """
    d = cfg.data
    problems = []
    if d.block_size < 2:
        problems.append(f"`data.block_size` ({d.block_size}) must be at least 2")
    if not 0.0 <= d.val_fraction < 1.0:
        problems.append(f"`data.val_fraction` ({d.val_fraction}) must be in [0, 1)")
    for name in ("max_documents", "max_tokens"):
        if getattr(d, name) < 0:
            problems.append(f"`data.{name}` ({getattr(d, name)}) must be >= 0 (0 means no limit)")
    if d.batch_documents < 1:
        problems.append(f"`data.batch_documents` ({d.batch_documents}) must be >= 1")
    if d.commit_interval_s < 0:
        problems.append(f"`data.commit_interval_s` ({d.commit_interval_s}) must be >= 0")
    if not cfg.run.dir:
        problems.append("`run.dir` must name a folder")
    problems += _validate_students(cfg)
    problems += _values_outside_choices(cfg)
    problems += _non_finite_numbers(cfg)
    problems += _validate_extract(cfg)
    problems += _validate_sae(cfg)
    problems += _validate_pretrain(cfg)
    if problems:
        raise ConfigError(_located(problems, sources, file_label))


# Every problem names its keys in full, in backticks: `section.key`.
_PROBLEM_KEY = re.compile(r"`([a-z_]+\.[a-z_0-9]+)`")


def _located(problems: list[str], sources: Mapping[str, str], file_label: str) -> str:
    """`where: problem; problem.` for each source of a problem, in the order the problems came."""
    by_source: dict[str, list[str]] = {}
    for problem in problems:
        by_source.setdefault(_source_of(problem, sources, file_label), []).append(problem)
    return " ".join(f"{where}: {'; '.join(items)}." for where, items in by_source.items())


def _source_of(problem: str, sources: Mapping[str, str], file_label: str) -> str:
    named = [key for key in _PROBLEM_KEY.findall(problem) if key in sources]
    return sources[max(named, key=lambda key: _precedence(sources[key]))] if named else file_label


def _precedence(where: str) -> int:
    return 2 if where.startswith("flag for ") else 1 if where.startswith("--set ") else 0


def _values_outside_choices(cfg: Config) -> list[str]:
    """Each value of a `Literal` field, or item of a `list[Literal]` field, that is not one of its choices."""
    problems = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            choices = field_choices(hints[item.name])
            if not choices:
                continue
            value = getattr(getattr(cfg, section), item.name)
            for one in dict.fromkeys(value) if isinstance(value, list) else (value,):
                if one not in choices:
                    problems.append(f"`{section}.{item.name}` ({one!r}) must be {spell_choices(choices)}")
    return problems


def _non_finite_numbers(cfg: Config) -> list[str]:
    """TOML reads `nan` and `inf` as floats, which slip past every range check (`nan <= 0` is False)."""
    import math

    return [
        f"`{section.name}.{item.name}` ({value}) must be a finite number"
        for section in dataclasses.fields(cfg)
        for item in dataclasses.fields(getattr(cfg, section.name))
        if isinstance(value := getattr(getattr(cfg, section.name), item.name), float)
        and not math.isfinite(value)
    ]


def _validate_sae(cfg: Config) -> list[str]:
    s = cfg.sae
    problems = []
    if s.k > s.latents:
        problems.append(f"`sae.k` ({s.k}) must not exceed `sae.latents` ({s.latents})")
    for name in (
        "latents",
        "k",
        "train_tokens",
        "batch_tokens",
        "buffer_tokens",
        "eval_every_tokens",
        "eval_tokens",
    ):
        if getattr(s, name) < 1:
            problems.append(f"`sae.{name}` ({getattr(s, name)}) must be >= 1")
    if s.buffer_tokens < s.batch_tokens:
        problems.append(
            f"`sae.buffer_tokens` ({s.buffer_tokens}) must be >= `sae.batch_tokens` ({s.batch_tokens})"
        )
    for name in ("lr", "aux_coef", "aux_k"):
        if getattr(s, name) < 0:
            problems.append(f"`sae.{name}` ({getattr(s, name)}) must be >= 0")
    return problems


def _validate_pretrain(cfg: Config) -> list[str]:
    p = cfg.pretrain
    problems = []
    for name in (
        "batch_blocks",
        "grad_accum",
        "max_steps",
        "concept_k",
        "save_every",
        "eval_every",
        "log_every",
    ):
        if getattr(p, name) < 1:
            problems.append(f"`pretrain.{name}` ({getattr(p, name)}) must be >= 1")
    non_negative = (
        "n_layer",
        "n_head",
        "n_embd",
        "insert_layer",
        "n_concepts",
        "warmup_steps",
        "eval_blocks",
    )
    for name in (*non_negative, "global_batch_blocks"):
        if getattr(p, name) < 0:
            problems.append(f"`pretrain.{name}` ({getattr(p, name)}) must be >= 0")
    if p.keep_last < 1:
        problems.append(f"`pretrain.keep_last` ({p.keep_last}) must be >= 1")
    if p.lr <= 0:
        problems.append(f"`pretrain.lr` ({p.lr}) must be > 0")
    if not 0 <= p.min_lr_ratio <= 1:
        problems.append(f"`pretrain.min_lr_ratio` ({p.min_lr_ratio}) must be in [0, 1]")
    for name in ("weight_decay", "grad_clip", "lam_concept", "kd_coef"):
        if getattr(p, name) < 0:
            problems.append(f"`pretrain.{name}` ({getattr(p, name)}) must be >= 0")
    if cfg.eval.limit < 0:
        problems.append(f"`eval.limit` ({cfg.eval.limit}) must be >= 0 (0 means all)")
    return problems


def _validate_students(cfg: Config) -> list[str]:
    """`run.objectives` names objectives or declared variants; seeds are distinct; each variant's resolved
    `[pretrain]` is in range (reported under the variant)."""
    from pipelines.config.students import student_config

    objectives, seeds = cfg.run.objectives, cfg.run.seeds
    problems = []
    if not objectives or len(set(objectives)) < len(objectives):
        problems.append(f"`run.objectives` ({objectives}) must list distinct names, at least one")
    unknown = [n for n in objectives if n not in OBJECTIVES and n not in cfg.run.variants]
    if unknown:
        declared = f"; declared variants: {', '.join(cfg.run.variants)}" if cfg.run.variants else ""
        problems.append(
            f"`run.objectives` names {', '.join(f'`{n}`' for n in unknown)}, which is neither an objective "
            f"({spell_choices(OBJECTIVES)}) nor a `[run.variants.NAME]`{declared}"
        )
    strangers = [n for n in cfg.run.baselines if n not in OBJECTIVES and n not in cfg.run.variants]
    if strangers:
        problems.append(
            f"`run.baselines` names {', '.join(f'`{n}`' for n in strangers)}, which is neither an objective "
            f"({spell_choices(OBJECTIVES)}) nor a `[run.variants.NAME]`"
        )
    if len(set(seeds)) < len(seeds) or any(seed < 0 for seed in seeds):
        problems.append(f"`run.seeds` ({seeds}) must list distinct seeds >= 0 (or be empty)")
    if cfg.pretrain.variant:
        problems.append(
            f"`pretrain.variant` ({cfg.pretrain.variant!r}) is set from `run.variants` by `run.objectives` "
            "and `cocomix pretrain --variant NAME`; leave it empty"
        )
    if cfg.pretrain.seed < -1:
        problems.append(f"`pretrain.seed` ({cfg.pretrain.seed}) must be >= 0, or -1 for `run.seed`")
    base = set(_validate_pretrain(cfg))
    for name in cfg.run.variants:
        variant = _validate_pretrain(student_config(cfg, name))
        problems += [f"{p} in `run.variants.{name}`" for p in variant if p not in base]
    return problems


def _validate_extract(cfg: Config) -> list[str]:
    e = cfg.extract
    problems = []
    for name in ("concepts_per_token", "blocks_per_chunk", "tokens_per_batch"):
        if getattr(e, name) < 1:
            problems.append(f"`extract.{name}` ({getattr(e, name)}) must be >= 1")
    if e.store_teacher_topk < 0:
        problems.append(f"`extract.store_teacher_topk` ({e.store_teacher_topk}) must be >= 0")
    return problems

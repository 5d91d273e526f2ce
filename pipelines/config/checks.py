"""Every check of a resolved config, reported at once under the place each value came from.

Field by field, from `pipelines.config.schema` itself: a `Literal` field's choices and a number field's
`Range` (its `accepts=`), read by one generic check; every float finite. Then the relations between fields,
which no single field can state (`sae.k` <= `sae.latents`, the students `run.objectives` names, ...). Each
problem carries the keys it concerns, so it is reported under the `--set`, flag or file that set them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

from pipelines.config.schema import SECTIONS, Config, field_choices, spell_choices
from pipelines.errors import ConfigError


class Problem(NamedTuple):
    keys: tuple[str, ...]  # `section.key` of every value involved
    text: str


def raise_problems(cfg: Config, sources: Mapping[str, str], file_label: str) -> None:
    """Gather every problem and raise once, so one edit fixes them all: each under where its value came
    from (`sources`: the file, a `--set`, a command flag); one naming keys from several places goes under
    the latest of them (flag > --set > file)."""
    problems = [*_field_problems(cfg), *_relation_problems(cfg)]
    if problems:
        raise ConfigError(_located(problems, sources, file_label))


def _field_problems(cfg: Config) -> list[Problem]:
    problems = []
    for section, cls in SECTIONS.items():
        problems += section_problems(getattr(cfg, section), section, typing.get_type_hints(cls))
    return problems


def section_problems(values: Any, section: str, hints: Mapping[str, Any] | None = None) -> list[Problem]:
    """One section's values outside their field's choices or range, and its non-finite numbers."""
    hints = hints or typing.get_type_hints(type(values))
    problems = []
    for item in dataclasses.fields(values):
        key, value = f"{section}.{item.name}", getattr(values, item.name)
        choices = field_choices(hints[item.name])
        for one in (dict.fromkeys(value) if isinstance(value, list) else (value,)) if choices else ():
            if one not in choices:
                problems.append(Problem((key,), f"`{key}` ({one!r}) must be {spell_choices(choices)}"))
        if isinstance(value, float) and not math.isfinite(value):  # TOML reads nan and inf: no range holds
            problems.append(Problem((key,), f"`{key}` ({value}) must be a finite number"))
            continue
        accepted = item.metadata.get("range")
        if accepted is not None and not accepted.holds(value):
            problems.append(Problem((key,), f"`{key}` ({value}) must be {accepted.rule()}{accepted.note}"))
    return problems


def _relation_problems(cfg: Config) -> list[Problem]:
    from pipelines.config.students import student_config
    from pipelines.objectives.declaration import objective_names

    run, s, p = cfg.run, cfg.sae, cfg.pretrain
    objectives = objective_names()
    problems = []
    if p.objective not in objectives:
        text = f"`pretrain.objective` ({p.objective!r}) must be {spell_choices(objectives)}"
        problems.append(Problem(("pretrain.objective",), text + " (or an objective of `pretrain.plugins`)"))
    if not run.dir:
        problems.append(Problem(("run.dir",), "`run.dir` must name a folder"))
    if s.k > s.latents:
        problems.append(
            Problem(("sae.k", "sae.latents"), f"`sae.k` ({s.k}) must not exceed `sae.latents` ({s.latents})")
        )
    if s.buffer_tokens < s.batch_tokens:
        problems.append(
            Problem(
                ("sae.buffer_tokens", "sae.batch_tokens"),
                f"`sae.buffer_tokens` ({s.buffer_tokens}) must be >= `sae.batch_tokens` ({s.batch_tokens})",
            )
        )
    if not run.objectives or len(set(run.objectives)) < len(run.objectives):
        text = f"`run.objectives` ({run.objectives}) must list distinct names, at least one"
        problems.append(Problem(("run.objectives",), text))
    for key, names in (("run.objectives", run.objectives), ("run.baselines", run.baselines)):
        unknown = [n for n in names if n not in objectives and n not in run.variants]
        if unknown:
            declared = f"; declared variants: {', '.join(run.variants)}" if run.variants else ""
            problems.append(
                Problem(
                    (key,),
                    f"`{key}` names {', '.join(f'`{n}`' for n in unknown)}, which is neither an objective "
                    f"({spell_choices(objectives)}) nor a `[run.variants.NAME]`{declared}",
                )
            )
    if len(set(run.seeds)) < len(run.seeds) or any(seed < 0 for seed in run.seeds):
        text = f"`run.seeds` ({run.seeds}) must list distinct seeds >= 0 (or be empty)"
        problems.append(Problem(("run.seeds",), text))
    if p.variant:
        problems.append(
            Problem(
                ("pretrain.variant",),
                f"`pretrain.variant` ({p.variant!r}) is set from `run.variants` by `run.objectives` and "
                "`cocomix pretrain --variant NAME`; leave it empty",
            )
        )
    # Each variant's own `[pretrain]`, reported under the variant where it differs from the section's.
    own = declared_setting_problems(p)  # the section's fields are checked with the other sections
    problems += own
    base = set(section_problems(p, "pretrain")) | set(own)
    for name in run.variants:
        variant = student_config(cfg, name).pretrain
        for problem in [*section_problems(variant, "pretrain"), *declared_setting_problems(variant)]:
            if problem not in base:
                problems.append(Problem(problem.keys, f"{problem.text} in `run.variants.{name}`"))
    return problems


def declared_setting_problems(p: Any) -> list[Problem]:
    """The keys that objectives declare (`ObjectiveSpec.settings`) outside their `accepts`, or not finite."""
    from pipelines.objectives.declaration import declared_setting

    problems = []
    for name, value in p.objective_settings.items():
        key, (_, setting) = f"pretrain.{name}", declared_setting(name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem((key,), f"`{key}` ({value}) must be a finite number"))
        elif setting.accepts is not None and not setting.accepts.holds(value):
            problems.append(Problem((key,), f"`{key}` ({value}) must be {setting.accepts.rule()}"))
    return problems


def _located(problems: list[Problem], sources: Mapping[str, str], file_label: str) -> str:
    """`where: problem; problem.` for each source of a problem, in the order the problems came."""
    by_source: dict[str, list[str]] = {}
    for problem in problems:
        named = [key for key in problem.keys if key in sources]
        where = sources[max(named, key=lambda key: _precedence(sources[key]))] if named else file_label
        by_source.setdefault(where, []).append(problem.text)
    return " ".join(f"{where}: {'; '.join(items)}." for where, items in by_source.items())


def _precedence(where: str) -> int:
    return 2 if where.startswith("flag for ") else 1 if where.startswith("--set ") else 0

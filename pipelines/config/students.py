"""The students of a run: each name of `run.objectives` (an objective or a `[run.variants.NAME]`) once per
seed of `run.seeds`, each with the config it trains with.

A variant is an objective plus overrides of `pretrain.*` keys; its config is the run's with those keys
replaced, so its fingerprint is its resolved settings, and everything upstream of pretraining (prepare, the
SAE, the extraction) is the run's, shared by every student. The seed of a student is `pretrain.seed`: set
per student from `run.seeds`, or -1 to take `run.seed` (one student per name, as before seeds existed).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from pipelines.config.schema import Config
from pipelines.errors import ConfigError
from pipelines.objectives.declaration import key_readers, objective_names

VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # no `-`: stage folders `pretrain-<name>-seed<k>` split on it
# Keys a variant may not set: what names and seeds the student, which `run.objectives` and `run.seeds` own.
RESERVED_KEYS = ("pretrain.objective", "pretrain.variant", "pretrain.seed")


@dataclass(frozen=True)
class Student:
    """One student of the run: a name of `run.objectives`, a seed (None: `run.seed`) and its config."""

    name: str
    seed: int | None
    cfg: Config

    @property
    def objective(self) -> str:
        return self.cfg.pretrain.objective


def students(cfg: Config) -> list[Student]:
    """Every student `cocomix run` trains, name-major: ntp seed 0, ntp seed 1, cocomix seed 0, ..."""
    seeds: list[int | None] = list(cfg.run.seeds) or [None]
    return [
        Student(name, seed, student_config(cfg, name, seed)) for name in cfg.run.objectives for seed in seeds
    ]


def student_config(cfg: Config, name: str, seed: int | None = None) -> Config:
    """The config a student trains with: the variant's overrides applied, its seed set."""
    settings = dict(cfg.pretrain.objective_settings)
    if name in objective_names():
        overrides: dict[str, Any] = {"objective": name, "variant": ""}
    elif name in cfg.run.variants:
        table = cfg.run.variants[name]
        overrides = {"variant": name, "objective": table["objective"]}
        fields = {f.name for f in dataclasses.fields(cfg.pretrain)}
        for key, value in table.items():
            key = key.removeprefix("pretrain.")
            if key in fields:
                overrides[key] = value
            elif key != "objective":  # a key its objective declares (`ObjectiveSpec.settings`)
                settings[key] = value
        overrides["objective_settings"] = settings
    else:
        raise ConfigError(
            f"`{name}` is neither an objective ({', '.join(objective_names())}) nor a variant of "
            "`run.variants`"
            + (f" ({', '.join(cfg.run.variants)})" if cfg.run.variants else "")
            + ". Declare it as `[run.variants.NAME]` with an `objective`."
        )
    if seed is not None:
        overrides["seed"] = seed
    return for_its_objective(
        dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, **overrides))
    )


def for_its_objective(cfg: Config) -> Config:
    """`cfg` with the `[pretrain]` keys its objective does not read at their defaults: the fields other
    objectives own and the settings others declare (`pipelines.objectives.declaration.key_readers`)."""
    p = cfg.pretrain
    readers = key_readers()
    defaults = {f.name: f.default for f in dataclasses.fields(p) if f.name in readers}
    unused: dict[str, Any] = {k: v for k, v in defaults.items() if p.objective not in readers[k]}
    own = {k: v for k, v in p.objective_settings.items() if p.objective in readers.get(k, ())}
    if own != p.objective_settings:
        unused["objective_settings"] = own
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(p, **unused)) if unused else cfg


def with_first_run_seed(cfg: Config) -> Config:
    """A command that names no seed trains or reads the run's first seed: in a run with `run.seeds`,
    `cocomix pretrain --objective cocomix` is `pretrain-cocomix-seed<first>/`, the student `cocomix run`
    trained (as `cocomix steer` reads it), not a `pretrain-cocomix/` of its own that would repeat it."""
    if cfg.pretrain.seed >= 0 or not cfg.run.seeds:
        return cfg
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, seed=cfg.run.seeds[0]))


def student_name(cfg: Config) -> str:
    """The name a config's student is trained and reported under: its variant, else its objective."""
    return cfg.pretrain.variant or cfg.pretrain.objective


def student_seed(cfg: Config) -> int:
    """The seed of the student's initialisation and data order."""
    return cfg.pretrain.seed if cfg.pretrain.seed >= 0 else cfg.run.seed


def first_student(cfg: Config, objective: str) -> Student | None:
    """The first student of the run that trains `objective` under its own name (the steering demo's)."""
    return next((s for s in students(cfg) if s.name == objective), None)

"""What an objective is, declared once and read by every layer: the config checks (its name, its own
`[pretrain]` keys with their types and ranges), the students (which keys it reads, so that others train with
them at their defaults), the planner (which store arrays it reads, which extraction settings they need),
the fingerprints (its keys' values; a plugin's file content), the concept-store checks, MFU (its extra
FLOPs) and the trainer (its loss, named `module:Class` and imported only there).

Nothing here imports torch: the config layer and `cocomix run --dry-run` read declarations without it.
The registry holds the built-ins (`pipelines.objectives.builtin`) from its import on, then the objectives of
the files of `pretrain.plugins` (`pipelines.objectives.plugins`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from pipelines.config.schema import ExtractConfig, PretrainConfig
from pipelines.errors import ConfigError
from pipelines.objectives.builtin import BUILTIN
from pipelines.objectives.spec import ALWAYS_STORED, MODELS, OBJECTIVE_NAME, Need, ObjectiveSpec, Setting

__all__ = ["Need", "ObjectiveSpec", "Setting", "register_objective", "registered", "objective_spec"]

_SCHEMA_KEYS = frozenset(f.name for f in dataclasses.fields(PretrainConfig))

_REGISTRY: dict[str, ObjectiveSpec] = {}
_declaring_file = ""  # the plugin file being loaded (`pipelines.objectives.plugins`): its objectives' source


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add an objective; its name, model, keys and settings are checked here, once, for every caller."""
    if _declaring_file:
        spec = dataclasses.replace(spec, source=_declaring_file)
    where = f"objective `{spec.name}`"
    if not OBJECTIVE_NAME.match(spec.name):
        raise ConfigError(f"{where}: a name is lowercase letters, digits and `_`, starting with a letter.")
    taken = _REGISTRY.get(spec.name)
    if taken is not None:
        raise ConfigError(f"{where} is already declared{_by(taken)}; choose another name.")
    if spec.model not in MODELS:
        raise ConfigError(f"{where}: `model` ({spec.model!r}) must be one of {', '.join(MODELS)}.")
    unknown = [key for key in spec.owns if key not in _SCHEMA_KEYS]
    if unknown:
        raise ConfigError(f"{where} owns {', '.join(unknown)}, which `[pretrain]` does not have.")
    for key, setting in spec.settings.items():
        other = declared_setting(key)
        if key in _SCHEMA_KEYS or other is not None:
            by = _by(other[0]) if other else " by the schema"
            raise ConfigError(f"{where} declares `pretrain.{key}`, which is already declared{by}.")
        if not isinstance(setting.default, (bool, int, float, str)):
            raise ConfigError(f"{where}: `pretrain.{key}`'s default must be a bool, number or string.")
    extract_keys = {f"extract.{f.name}" for f in dataclasses.fields(ExtractConfig)}
    for need in spec.needs:
        if need.key not in extract_keys:
            raise ConfigError(f"{where} needs `{need.key}`, which `[extract]` does not have.")
    provided = {array for need in spec.needs for array in need.arrays}
    for array in () if callable(spec.reads) else spec.reads:
        if array not in ALWAYS_STORED and array not in provided:
            raise ConfigError(
                f"{where} reads `{array}` from the concept store, which holds only "
                f"{', '.join(ALWAYS_STORED)} unless a `Need` of the objective names the `extract.*` setting "
                "that stores it."
            )
    _REGISTRY[spec.name] = spec
    return spec


def unregister_source(source: str) -> None:
    """Forget the objectives a plugin file declared, before that file is loaded again."""
    for name in [name for name, spec in _REGISTRY.items() if spec.source == source]:
        del _REGISTRY[name]


def declaring(source: str):
    """While loading plugin file `source`: the objectives registered are stamped with it."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        global _declaring_file
        _declaring_file = source
        try:
            yield
        finally:
            _declaring_file = ""

    return scope()


def _by(spec: ObjectiveSpec) -> str:
    return f" by {spec.source}" if spec.source else " by cocomix"


def registered() -> dict[str, ObjectiveSpec]:
    """Every declared objective: the built-ins first, then those of the plugins loaded so far."""
    return _REGISTRY


def objective_names() -> tuple[str, ...]:
    return tuple(registered())


def objective_spec(name: str) -> ObjectiveSpec:
    spec = registered().get(name)
    if spec is None:
        raise ConfigError(
            f"`pretrain.objective` ({name!r}) is not a declared objective; declared: "
            f"{', '.join(objective_names())} (a plugin's file goes in `pretrain.plugins`)."
        )
    return spec


def declared_setting(key: str) -> tuple[ObjectiveSpec, Setting] | None:
    """The objective that declares `pretrain.<key>`, and the setting; None when none does."""
    for spec in registered().values():
        if key in spec.settings:
            return spec, spec.settings[key]
    return None


def key_readers() -> dict[str, tuple[str, ...]]:
    """`[pretrain]` keys that only some objectives read (fields they own, settings they declare): which."""
    readers: dict[str, tuple[str, ...]] = {}
    for spec in registered().values():
        for key in (*spec.owns, *spec.settings):
            readers[key] = (*readers.get(key, ()), spec.name)
    return readers


def setting_value(p: PretrainConfig, key: str) -> Any:
    """A declared setting's value for this student: the config's, else its declared default."""
    found = declared_setting(key)
    if found is None:
        raise KeyError(f"no objective declares `pretrain.{key}`")
    return p.objective_settings.get(key, found[1].default)


def load_loss(spec: ObjectiveSpec) -> type:
    """The loss class the declaration names: imported here, by the trainer, and nowhere earlier."""
    if not isinstance(spec.loss, str):
        return spec.loss
    module_name, _, class_name = spec.loss.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(
            f"objective `{spec.name}`{_by(spec)} names its loss `{spec.loss}`, but {module_name} has no "
            f"`{class_name}`."
        ) from None


for _builtin in BUILTIN:
    register_objective(_builtin)

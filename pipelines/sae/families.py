"""The SAE families by name: the one declaration that loading, saving, attribution, the concept targets,
`train-sae` (`sae.architecture`) and the SAELens layout read.

Torch-free, so that planning (`cocomix run`) can check the names without importing a model: a family is named
by the module and class that implement it (a `pipelines.sae.base.SparseAutoencoder`), imported on first use.
`saelens` lists the `architecture` values of a SAELens `cfg.json` that load as the family; `trainable` says
that `train-sae` can train it. Adding a family is its module plus one `register_sae_family` line here
(docs/DEVELOPMENT.md, "Adding an SAE family").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipelines.errors import ConfigError


@dataclass(frozen=True)
class SaeFamily:
    name: str
    target: str
    """`module:Class` of its `SparseAutoencoder`."""
    trainable: bool
    saelens: tuple[str, ...]

    def load_class(self) -> type:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, SaeFamily] = {}


def register_sae_family(name: str, target: str, *, trainable: bool = False, saelens: tuple[str, ...] = ()):
    if name in FAMILIES:
        raise ValueError(f"SAE family {name!r} is registered twice")
    FAMILIES[name] = SaeFamily(name, target, trainable, saelens)


def sae_class(name: str) -> type:
    """The `SparseAutoencoder` subclass of family `name` (one of `FAMILIES`)."""
    return FAMILIES[name].load_class()


def trainable_families() -> tuple[str, ...]:
    return tuple(name for name, family in FAMILIES.items() if family.trainable)


def check_trainable(architecture: str) -> None:
    """Refuse a `sae.architecture` that `train-sae` cannot train, naming the ones it can. (Checked by the
    stages that train or plan training: the config layer sits below the building blocks.)"""
    trainable = trainable_families()
    if architecture not in trainable:
        names = ", ".join(f"`{name}`" for name in trainable)
        raise ConfigError(
            f"`sae.architecture` ({architecture!r}) must be an SAE family `train-sae` trains: {names}. Set "
            "it to one of them, or register yours in `pipelines/sae/families.py`."
        )


def saelens_architectures() -> dict[str, str]:
    """SAELens `architecture` value -> the family it loads as."""
    return {saelens: family.name for family in FAMILIES.values() for saelens in family.saelens}


register_sae_family("topk", "pipelines.sae.topk_sae:TopKSAE", trainable=True, saelens=("topk",))
register_sae_family("relu", "pipelines.sae.relu_sae:ReLUSAE", saelens=("standard",))
register_sae_family("jumprelu", "pipelines.sae.jumprelu_sae:JumpReLUSAE", saelens=("jumprelu",))
register_sae_family("batchtopk", "pipelines.sae.batchtopk_sae:BatchTopKSAE", trainable=True)

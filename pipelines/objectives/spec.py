"""What an objective is, as the torch-free layers read it: `ObjectiveSpec` (its name, loss, model, store
arrays, keys, extraction needs and extra FLOPs), `Setting` (a `[pretrain]` key of its own) and `Need` (an
extraction setting whose arrays it reads). Plain data: the registry is `pipelines.objectives.declaration`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines.config.schema import PretrainConfig, Range

# The model variants of `pipelines.model.gpt.VARIANTS` (its tests keep them equal): which student an
# objective trains, and so which outputs its loss can read (`logits` and `hidden` always, `concept_logits`
# from `cocomix`).
MODELS = ("ntp", "cocomix", "pause")
# No `-`: stage folders `pretrain-<name>-seed<k>` split on it.
OBJECTIVE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Setting:
    """A `[pretrain]` key an objective declares itself, e.g. MTP's `mtp_coef`: set as `pretrain.mtp_coef`
    in the file, a `--set` or a variant, checked against `accepts`, and in the fingerprint of that
    objective's students only. Its type is its default's (an int is accepted where the default is a float)."""

    default: bool | int | float | str
    doc: str
    accepts: Range | None = None


@dataclass(frozen=True)
class Need:
    """Concept-store arrays that exist only when an extraction setting is on, and how to say so."""

    key: str  # the `extract.*` setting that must be true or non-zero, e.g. `extract.store_teacher_topk`
    example: str  # a value to set it to, e.g. `32`
    what: str  # what the arrays are, in words: "the teacher's top-N log-probs"
    arrays: tuple[str, ...]  # the store arrays it adds
    flag: str = ""  # the `extract-concepts` flag that sets it, if it has one
    when: Callable[[PretrainConfig], bool] | None = None  # needed only by students with these settings

    def applies(self, p: PretrainConfig) -> bool:
        return self.when is None or self.when(p)

    def is_met(self, extract: Any) -> bool:
        return bool(getattr(extract, self.key.removeprefix("extract.")))

    def option(self) -> str:
        """The `extract-concepts` option that turns the setting on."""
        return self.flag or f"--set {self.key}={self.example}"


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: what the torch-free layers need to plan, check and fingerprint its students."""

    name: str
    loss: (
        str | type
    )  # its loss class, a subclass of `pipelines.training.objectives.Objective`: `module:Class`
    summary: str  # one line, for docs and messages
    model: str = "ntp"  # the student it trains, one of `MODELS`
    reads: tuple[str, ...] | Callable[[PretrainConfig], tuple[str, ...]] = ()  # concept-store arrays
    owns: tuple[
        str, ...
    ] = ()  # fields of `[pretrain]` in the schema that only it (and others owning them) reads
    settings: Mapping[str, Setting] = field(default_factory=dict)  # `[pretrain]` keys of its own
    needs: tuple[Need, ...] = ()
    # Forward FLOPs per token of what it adds to the student's (a training-only head), from the model
    # config and the sequence length; MFU counts 3x them, as for the student.
    extra_flops: Callable[[Any, int], float] | None = None
    source: str = ""  # the `pretrain.plugins` file that declared it; empty for a built-in

    def arrays(self, p: PretrainConfig) -> tuple[str, ...]:
        """The concept-store arrays a student with these settings reads."""
        return self.reads(p) if callable(self.reads) else self.reads

    def unmet_needs(self, p: PretrainConfig, extract: Any) -> list[Need]:
        return [need for need in self.needs if need.applies(p) and not need.is_met(extract)]


# Arrays every concept store holds; the others exist when an extraction setting (a `Need`) is on.
ALWAYS_STORED = ("concept_ids", "valid")

"""Every step of `cocomix run`, declared once: its name, its folder, what plans and runs it, the step it waits
for, and the command that runs it alone with the flag that resumes that command.

The run layout (`layout`), the plan and `cocomix run` (`pipelines.stages.workflow`), `run --from/--until`,
the CLI's stage commands and its interrupt advice all read these declarations, so a new stage is one
`register_stage(StageSpec(...))` (docs/DEVELOPMENT.md, "Adding a stage"). The declarations stay torch-free:
what plans and runs a step is named `module:function` and imported only when called, so that planning
(`cocomix run --dry-run`, `cocomix --help`) never loads a model library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """One step of `cocomix run`."""

    step: str
    """The name `cocomix run --from/--until` take, and the plan's `step` column."""
    folder: str | None
    """Its folder in the run folder; None for a step with one folder per student, named by its planner."""
    planner: str
    """`module:function`, `function(cfg) -> list[StagePlan]`: what the step makes for a config, one entry
    per folder; an empty list leaves the step out of the run (train-sae when `sae.path` is set)."""
    runner: str
    """`module:function`, `function(cfg, row, progress)`: makes one planned folder (`row`, a
    `workflow.PlannedStage`); what the last step returns is the run's summary."""
    after: str = ""
    """The step whose outputs it waits for (schedulers read it from the plan); when the run leaves that step
    out, the step that one waits for. Empty: none."""
    command: str | None = None
    """`cocomix COMMAND` runs the step alone; None: only `cocomix run` does."""
    resumes: bool = True
    """Whether running `command` again after an interrupt resumes the step (steer starts over)."""
    resume_flag: str | None = None
    """The flag that running `command` again needs to resume (pretrain's `--resume`); None: none."""
    job: str | None = None
    """For schedulers, the command that makes the step when it is not the step's own command (eval, steer
    and the report are one job, `cocomix run --from eval`)."""
    state: str | None = None
    """The plan's state for a step that always runs and whose own cache decides what is redone (eval), in
    place of the one its manifest gives; None: read the manifest."""


@dataclass(frozen=True)
class StagePlan:
    """One folder that a step makes in this run, as its planner reads it from the config."""

    detail: str
    """What it will make, one line for the plan."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """The config values its manifest records (`stage_inputs`); a change is refused."""
    folder: str | None = None
    """Its folder, for a step with several (`pretrain-cocomix`); None: the step's own `folder`."""
    after: str | None = None
    """The step this folder waits for when not the step's `after` (an NTP student waits for prepare only)."""


# The steps in run order. A test that registers a stage of its own swaps in a copy first (`monkeypatch`).
REGISTRY: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec, *, before: str | None = None) -> StageSpec:
    """Add a step to the run, at the end or just before the step `before`."""
    if spec.step in REGISTRY:
        raise ValueError(f"stage {spec.step!r} is registered twice")
    if before is not None and before not in REGISTRY:
        raise ValueError(f"stage {spec.step!r} is registered before {before!r}, which is not a stage")
    specs = list(REGISTRY.values())
    specs.insert(specs.index(REGISTRY[before]) if before else len(specs), spec)
    REGISTRY.clear()
    REGISTRY.update((s.step, s) for s in specs)
    return spec


def stage_specs() -> tuple[StageSpec, ...]:
    """Every step, in run order."""
    return tuple(REGISTRY.values())


def steps() -> tuple[str, ...]:
    """The step names, in run order (what `--from` and `--until` choose from)."""
    return tuple(REGISTRY)


def stage_spec(step: str) -> StageSpec:
    return REGISTRY[step]


def stage_folder(step: str) -> str:
    """The folder of a step that has one."""
    folder = REGISTRY[step].folder
    assert folder is not None, f"stage {step!r} has one folder per student"
    return folder


def spec_of_folder(folder: str) -> StageSpec | None:
    """The step whose folder this is, or None (a student's `pretrain-NAME`, `concepts`, ...)."""
    return next((s for s in REGISTRY.values() if s.folder == folder), None)


def load(reference: str) -> Callable[..., Any]:
    """The function a `module:function` reference names, imported now."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


# --- the steps of `cocomix run` ------------------------------------------------------------------------
# Their planners and runners are in `pipelines.stages.workflow`, the one stage module that may import the
# others (docs/DEVELOPMENT.md); a stage of its own module can name functions there instead.

_WORKFLOW = "pipelines.stages.workflow"
_EVAL_JOB = "cocomix run --from eval"

register_stage(
    StageSpec(
        "prepare",
        folder="prepare",
        planner=f"{_WORKFLOW}:plan_prepare",
        runner=f"{_WORKFLOW}:run_prepare",
        command="prepare",
    )
)
register_stage(
    StageSpec(
        "train-sae",
        folder="train-sae",
        planner=f"{_WORKFLOW}:plan_train_sae",
        runner=f"{_WORKFLOW}:run_train_sae",
        after="prepare",
        command="train-sae",
    )
)
register_stage(
    StageSpec(
        "extract-concepts",
        folder="extract-concepts",
        planner=f"{_WORKFLOW}:plan_extract",
        runner=f"{_WORKFLOW}:run_extract",
        after="train-sae",
        command="extract-concepts",
    )
)
register_stage(
    StageSpec(
        "pretrain",
        folder=None,  # `pretrain-NAME` per student (`layout.student_stage`)
        planner=f"{_WORKFLOW}:plan_pretrain",
        runner=f"{_WORKFLOW}:run_pretrain",
        after="extract-concepts",
        command="pretrain",
        resume_flag="--resume",  # pretrain refuses to touch its checkpoints without it
    )
)
register_stage(
    StageSpec(
        "eval",
        folder="eval",
        planner=f"{_WORKFLOW}:plan_eval",
        runner=f"{_WORKFLOW}:run_eval",
        after="pretrain",
        command="eval",  # scores only what its cache lacks
        job=_EVAL_JOB,
        state="cached per model and task",
    )
)
register_stage(
    StageSpec(
        "steer",
        folder="steer",
        planner=f"{_WORKFLOW}:plan_steer",
        runner=f"{_WORKFLOW}:run_steer",
        after="pretrain",
        command="steer",
        resumes=False,
        job=_EVAL_JOB,
    )
)
register_stage(
    StageSpec(
        "report",
        folder="report",
        planner=f"{_WORKFLOW}:plan_report",
        runner=f"{_WORKFLOW}:run_report",  # rebuilt from the stages' files every time
        after="pretrain",
        job=_EVAL_JOB,
        state="-",
    )
)

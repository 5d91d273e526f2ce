"""`cocomix run`: every stage from one config, in order, each skipped when up to date and resumed when not.

The steps are prepare -> train-sae (when `sae.path` is empty and a student needs concepts) ->
extract-concepts (for `cocomix` and `kd`) -> pretrain (one stage per student: each name of `run.objectives`,
an objective or a `[run.variants.NAME]`, once per seed of `run.seeds`; `pipelines.config.students`) -> eval
-> steer (the demo, on the first `cocomix` student) -> report. Each step is the stage's own `run`, so the
rules of the single commands hold: a finished stage with the same fingerprint is skipped, an interrupted one
resumes, one whose inputs changed is refused with the differences. The report (`summary.json`, `report.md`,
`loss_curves.png` in the run folder) is rebuilt from the stages' files, so an interrupted and resumed run
reports what an uninterrupted one does. The steps, and the functions below that plan and run each, are
declared in `pipelines.core.stage_registry`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config.schema import Config
from pipelines.config.students import first_student, students
from pipelines.core.files import read_json
from pipelines.core.layout import FINAL_MODEL, MANIFEST, stage_command, student_stage
from pipelines.core.locks import writer_holders
from pipelines.core.session import ORPHAN_OUTPUTS, holds_orphan_outputs
from pipelines.core.stage_registry import StagePlan, StageSpec, load, stage_spec, stage_specs, steps
from pipelines.errors import ConfigError
from pipelines.objectives.declaration import objective_spec
from pipelines.sae.families import check_trainable

log = logging.getLogger(__name__)

BEING_WRITTEN = "being written by"  # the state of a stage another process writes, before its lock holders


@dataclass(frozen=True)
class PlannedStage:
    """One row of the plan: a stage folder, what is on disk, and what `cocomix run` will do with it."""

    step: str  # one of `steps()` (`--from` / `--until` name these)
    stage: str  # its folder in the run, e.g. `pretrain-cocomix`
    state: str  # on disk: `not started`, `interrupted`, `complete`, `complete, but data.x changed`, ...
    action: str  # skip, resume, run, refuse
    detail: str
    # For schedulers (configs/slurm/submit.sh): the command that makes the stage, and the step whose
    # outputs it waits for (`""` for none). Eval, steer and report are `cocomix run --from eval`.
    command: str = ""
    after: str = ""


def plan(cfg: Config, first: str | None = None, last: str | None = None) -> list[PlannedStage]:
    """The stages `cocomix run` would execute, with their state on disk; reads only manifests."""
    run_dir = Path(cfg.run.dir)
    selected = _selected_steps(first, last)
    stages = _stages(cfg)
    planned = {spec.step for spec, _ in stages}
    rows = []
    for spec, made in stages:
        if spec.step not in selected:
            continue
        stage = made.folder or spec.folder
        state, action = _state(run_dir, spec, stage, made.inputs)
        command = spec.job or stage_command(stage)
        after = _waits_for(spec.after if made.after is None else made.after, planned)
        rows.append(PlannedStage(spec.step, stage, state, action, made.detail, command, after))
    return rows


def execute(
    cfg: Config,
    first: str | None = None,
    last: str | None = None,
    progress: bool = True,
    announce: Callable[[int, int, PlannedStage], None] = lambda i, n, row: None,
) -> dict[str, Any] | None:
    """Run the planned stages; returns the run summary when the last step (the report) ran."""
    rows = plan(cfg, first, last)
    refused = [r for r in rows if r.action == "refuse"]
    if refused:
        r = refused[0]
        if r.state.startswith(BEING_WRITTEN):  # --force would fight the writer: wait for it instead
            raise ConfigError(
                f"{Path(cfg.run.dir) / r.stage} is {r.state}. Wait for it to finish or stop it, then run "
                "this command again."
            )
        raise ConfigError(
            f"{Path(cfg.run.dir) / r.stage} is {r.state}. Set `run.dir` to a new folder, or rerun that "
            f"stage alone with --force (`cocomix {_command(r)} --force`)."
        )
    summary = None
    for index, row in enumerate(rows, start=1):
        announce(index, len(rows), row)
        summary = load(stage_spec(row.step).runner)(cfg, row, progress)
    return summary if rows and rows[-1].step == steps()[-1] else None


# --- what runs ---------------------------------------------------------------------------------------


def _stages(cfg: Config) -> list[tuple[StageSpec, StagePlan]]:
    """Each registered step with each folder its planner makes for this config, in run order.

    Descriptions and inputs come from the config as written: a `pypi:` spec and the local files it resolves
    to have the same fingerprint value, so a plan made before the package is fetched (or after the asset
    cache moved) agrees with the manifests.
    """
    trained = students(cfg)
    reading = [s for s in trained if _reads_concepts(s)]
    needs_concepts = bool(reading)
    for student in reading:
        for need in objective_spec(student.objective).unmet_needs(student.cfg.pretrain, cfg.extract):
            what = f"`{student.name}`" + (f" (`{student.objective}`)" if student.cfg.pretrain.variant else "")
            raise ConfigError(
                f"`run.objectives` has {what}, which needs {need.what}: set `{need.key}` "
                f"(e.g. {need.example})."
            )
    if needs_concepts and not cfg.teacher.model:
        names = ", ".join(dict.fromkeys(s.objective for s in reading))
        raise ConfigError(f"`run.objectives` has {names}, which needs a teacher: set `teacher.model`.")
    return [(spec, made) for spec in stage_specs() for made in load(spec.planner)(cfg)]


def _waits_for(step: str, planned: set[str]) -> str:
    """`step`, or when the run leaves it out, the step it waits for in turn (extract-concepts waits for
    prepare when the SAE is not trained in the run)."""
    while step and step not in planned:
        step = stage_spec(step).after
    return step


def _selected_steps(first: str | None, last: str | None) -> set[str]:
    order = steps()
    for name, value in (("--from", first), ("--until", last)):
        if value is not None and value not in order:
            raise ConfigError(f"{name} {value!r} is not a step; choose from {', '.join(order)}.")
    start = order.index(first) if first else 0
    stop = order.index(last) if last else len(order) - 1
    if start > stop:
        raise ConfigError(
            f"--from {first} comes after --until {last}; steps run in the order {', '.join(order)}."
        )
    return set(order[start : stop + 1])


def _state(run_dir: Path, spec: StageSpec, stage: str, inputs: dict[str, Any]) -> tuple[str, str]:
    if spec.state is not None:
        return spec.state, "run"
    manifest = read_json(run_dir / stage / MANIFEST)
    if manifest is None:
        if holds_orphan_outputs(run_dir / stage):
            return ORPHAN_OUTPUTS, "refuse"
        return "not started", "run"
    recorded = manifest.get("inputs", {})
    changed = [k for k, v in inputs.items() if k in recorded and recorded[k] != v]
    status = manifest.get("status", "running")
    if changed and status in ("complete", "running"):
        more = f" and {len(changed) - 2} more" if len(changed) > 2 else ""
        return f"{status}, but {', '.join(changed[:2])}{more} changed", "refuse"
    if status == "complete":
        return "complete", "skip"
    if status in ("running", "clearing"):
        holders = writer_holders(run_dir / stage)  # its one writer, or its shards' and ranks'
        return (f"{BEING_WRITTEN} {', '.join(holders)}", "refuse") if holders else ("interrupted", "resume")
    return status, "resume"


def _command(row: PlannedStage) -> str:
    return stage_command(row.stage).removeprefix("cocomix ")


def student_stages(cfg: Config) -> list[str]:
    """The pretrain folders of the run's students, in `students` order."""
    return [student_stage(s.cfg) for s in students(cfg)]


def _reads_concepts(student) -> bool:
    """Whether the student's objective reads concepts.zarr (its declaration's store arrays)."""
    return bool(objective_spec(student.objective).arrays(student.cfg.pretrain))


def _needs_concepts(cfg: Config) -> bool:
    return any(_reads_concepts(s) for s in students(cfg))


# --- the steps: what each makes for a config (`plan_*`) and how `cocomix run` makes it (`run_*`) --------
# Named by their declarations in `pipelines.core.stage_registry`.


def plan_prepare(cfg: Config) -> list[StagePlan]:
    from pipelines.core import stage_inputs

    d = cfg.data
    detail = f"tokenize {d.source} with {d.tokenizer} into {d.block_size}-token blocks" + (
        f" (first {d.max_tokens:,} tokens)" if d.max_tokens else ""
    )
    return [StagePlan(detail, stage_inputs.prepare(cfg))]


def run_prepare(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import prepare

    prepare.run(cfg, progress=progress)


def plan_train_sae(cfg: Config) -> list[StagePlan]:
    from pipelines.core import stage_inputs

    s = cfg.sae
    if not _needs_concepts(cfg) or s.path:
        return []
    check_trainable(s.architecture)
    detail = (
        f"{s.architecture} SAE, {s.latents:,} latents, k={s.k}, {s.train_tokens:,} tokens of the "
        f"teacher's layer {cfg.teacher.layer}"
    )
    return [StagePlan(detail, stage_inputs.train_sae(cfg))]


def run_train_sae(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import train_sae

    if train_sae.run(cfg, progress=progress).stopped is not None:  # SIGTERM / Ctrl-C: saved, resumable
        raise KeyboardInterrupt


def plan_extract(cfg: Config) -> list[StagePlan]:
    from pipelines.core import stage_inputs

    if not _needs_concepts(cfg):
        return []
    sae = f"SAE {cfg.sae.path}" if cfg.sae.path else "the SAE trained in this run"
    detail = f"top-{cfg.extract.concepts_per_token} concepts per token from {sae}"
    return [StagePlan(detail, stage_inputs.extract_concepts(cfg))]


def run_extract(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import extract

    extract.run(cfg, progress=progress)


def plan_pretrain(cfg: Config) -> list[StagePlan]:
    from pipelines.core import stage_inputs

    made = []
    for student in students(cfg):
        sp = student.cfg.pretrain
        schedule = f"{sp.max_steps:,} steps of {_batch_text(sp, cfg.data.block_size)}"
        seed = f", seed {student.seed}" if student.seed is not None else ""
        what = f"{student.name} ({sp.objective})" if sp.variant else student.name
        detail = f"{what} student{seed}, preset {sp.preset}, {schedule}"
        after = None if _reads_concepts(student) else "prepare"  # NTP needs no concepts
        made.append(StagePlan(detail, stage_inputs.pretrain(student.cfg), student_stage(student.cfg), after))
    return made


def _batch_text(p, block_size: int) -> str:
    if p.global_batch_blocks:
        tokens = p.max_steps * p.global_batch_blocks * block_size
        return f"{p.global_batch_blocks:,} blocks ({tokens:,} tokens)"
    return f"{p.batch_blocks * p.grad_accum:,} blocks per rank"


def run_pretrain(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import pretrain

    (student,) = [s for s in students(cfg) if student_stage(s.cfg) == row.stage]
    result = pretrain.run(student.cfg, resume=True, progress=progress)
    if result.stopped is not None:  # SIGTERM / Ctrl-C: saved; the next `cocomix run` resumes
        raise KeyboardInterrupt


def plan_eval(cfg: Config) -> list[StagePlan]:
    tasks = ", ".join(cfg.eval.tasks)
    names = ", ".join(cfg.run.objectives)
    seeds = f" x seeds {', '.join(map(str, cfg.run.seeds))}" if cfg.run.seeds else ""
    return [StagePlan(f"{tasks} for {names}{seeds}")]


def run_eval(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import evaluate

    evaluate.run(_eval_config(cfg), progress=progress)


def _eval_config(cfg: Config) -> Config:
    models = cfg.eval.models or [
        str(Path(cfg.run.dir) / stage / FINAL_MODEL) for stage in student_stages(cfg)
    ]
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, models=models))


def plan_steer(cfg: Config) -> list[StagePlan]:
    demo = first_student(cfg, "cocomix")
    if demo is None:
        return []
    return [StagePlan(f"inspect and sweep {cfg.steer.demo_scales} on {student_stage(demo.cfg)}")]


def run_steer(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import steer

    steer.run(cfg)


def plan_report(cfg: Config) -> list[StagePlan]:
    return [StagePlan("summary.json, report.md, report.html, loss_curves.png")]


def run_report(cfg: Config, row: PlannedStage, progress: bool) -> dict[str, Any]:
    from pipelines.stages import report

    return report.write(cfg, plan(cfg))  # the page shows what a rerun would do

"""`cocomix run`: every stage from one config, in order, each skipped when up to date and resumed when not.

The steps are prepare -> train-sae (when `sae.path` is empty and a student needs concepts) ->
extract-concepts (for `cocomix` and `kd`) -> pretrain (one stage per student: each name of `run.objectives`,
an objective or a `[run.variants.NAME]`, once per seed of `run.seeds`; `pipelines.config.students`) -> eval
-> steer (the demo, on the first `cocomix` student) -> report. Each step is the stage's own `run`, so the
rules of the single commands hold: a finished stage with the same fingerprint is skipped, an interrupted one
resumes, one whose inputs changed is refused with the differences. The report (`summary.json`, `report.md`,
`loss_curves.png` in the run folder) is rebuilt from the stages' files, so an interrupted and resumed run
reports what an uninterrupted one does.
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
from pipelines.errors import ConfigError
from pipelines.sae.families import check_trainable

log = logging.getLogger(__name__)

STEPS = ("prepare", "train-sae", "extract-concepts", "pretrain", "eval", "steer", "report")
CONCEPT_OBJECTIVES = ("cocomix", "kd")  # objectives that read concepts.zarr
BEING_WRITTEN = "being written by"  # the state of a stage another process writes, before its lock holders


@dataclass(frozen=True)
class PlannedStage:
    """One row of the plan: a stage folder, what is on disk, and what `cocomix run` will do with it."""

    step: str  # one of STEPS (`--from` / `--until` name these)
    stage: str  # its folder in the run, e.g. `pretrain-cocomix`
    state: str  # on disk: `not started`, `interrupted`, `complete`, `complete, but data.x changed`, ...
    action: str  # skip, resume, run, refuse
    detail: str
    # For schedulers (configs/slurm/submit.sh): the command that makes the stage, and the stage whose
    # outputs it waits for (`""` for none). Eval, steer and report are `cocomix run --from eval`.
    command: str = ""
    after: str = ""


def plan(cfg: Config, first: str | None = None, last: str | None = None) -> list[PlannedStage]:
    """The stages `cocomix run` would execute, with their state on disk; reads only manifests."""
    run_dir = Path(cfg.run.dir)
    selected = _selected_steps(first, last)
    rows = []
    stages = _stages(cfg)
    upstream = [stage for _, stage, *_ in stages if stage in ("prepare", "train-sae")]
    for step, stage, detail, inputs, reads_concepts in stages:
        if step not in selected:
            continue
        state, action = _state(run_dir, step, stage, inputs)
        command = stage_command(stage) if step in STEPS[:4] else "cocomix run --from eval"
        after = {
            "prepare": "",
            "train-sae": "prepare",
            "extract-concepts": upstream[-1],
            "pretrain": "extract-concepts" if reads_concepts else "prepare",
        }.get(step, "pretrain")
        rows.append(PlannedStage(step, stage, state, action, detail, command, after))
    return rows


def execute(
    cfg: Config,
    first: str | None = None,
    last: str | None = None,
    progress: bool = True,
    announce: Callable[[int, int, PlannedStage], None] = lambda i, n, row: None,
) -> dict[str, Any] | None:
    """Run the planned stages; returns the run summary when the report step ran."""
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
        summary = _RUNNERS[row.step](cfg, row, progress)
    return summary if rows and rows[-1].step == "report" else None


# --- what runs ---------------------------------------------------------------------------------------


def _stages(cfg: Config) -> list[tuple[str, str, str, dict[str, Any], bool]]:
    """(step, stage folder, description, config inputs recorded in its manifest, whether it reads the
    concepts) in run order.

    Descriptions and inputs come from the config as written: a `pypi:` spec and the local files it resolves
    to have the same fingerprint value, so a plan made before the package is fetched (or after the asset
    cache moved) agrees with the manifests.
    """
    from pipelines.core import stage_inputs
    from pipelines.core.fingerprints import fingerprint_fields

    trained = students(cfg)
    objectives = list(dict.fromkeys(s.objective for s in trained))
    needs_concepts = any(o in CONCEPT_OBJECTIVES for o in objectives)
    if "kd" in objectives and not cfg.extract.store_teacher_topk:
        raise ConfigError(
            "`run.objectives` has `kd`, which needs the teacher's top-N log-probs: set "
            "`extract.store_teacher_topk` (e.g. 32)."
        )
    if needs_concepts and not cfg.teacher.model:
        raise ConfigError(
            f"`run.objectives` has {', '.join(o for o in objectives if o in CONCEPT_OBJECTIVES)}, "
            "which needs a teacher: set `teacher.model`."
        )
    by_activation = [
        s.name for s in trained if s.objective == "cocomix" and s.cfg.pretrain.concept_targets == "activation"
    ]
    if by_activation and not cfg.extract.store_sae_topk:
        raise ConfigError(
            f'`{by_activation[0]}` sets `pretrain.concept_targets = "activation"`, which reads the SAE '
            "top-k of the extraction: set `extract.store_sae_topk = true`."
        )
    d, s = cfg.data, cfg.sae
    stages = [
        (
            "prepare",
            "prepare",
            f"tokenize {d.source} with {d.tokenizer} into {d.block_size}-token blocks"
            + (f" (first {d.max_tokens:,} tokens)" if d.max_tokens else ""),
            stage_inputs.prepare(cfg),
            False,
        )
    ]
    if needs_concepts and not s.path:
        check_trainable(s.architecture)
        stages.append(
            (
                "train-sae",
                "train-sae",
                f"{s.architecture} SAE, {s.latents:,} latents, k={s.k}, {s.train_tokens:,} tokens of the "
                f"teacher's layer {cfg.teacher.layer}",
                stage_inputs.train_sae(cfg),
                False,
            )
        )
    if needs_concepts:
        sae = f"SAE {s.path}" if s.path else "the SAE trained in this run"
        stages.append(
            (
                "extract-concepts",
                "extract-concepts",
                f"top-{cfg.extract.concepts_per_token} concepts per token from {sae}",
                stage_inputs.extract_concepts(cfg),
                False,
            )
        )
    for student in trained:
        sp = student.cfg.pretrain
        inputs = fingerprint_fields(sp, "pretrain")
        steps = f"{sp.max_steps:,} steps of {_batch_text(sp, d.block_size)}"
        seed = f", seed {student.seed}" if student.seed is not None else ""
        what = f"{student.name} ({sp.objective})" if sp.variant else student.name
        detail = f"{what} student{seed}, preset {sp.preset}, {steps}"
        reads_concepts = sp.objective in CONCEPT_OBJECTIVES
        stages.append(("pretrain", student_stage(student.cfg), detail, inputs, reads_concepts))
    tasks = ", ".join(cfg.eval.tasks)
    names = ", ".join(cfg.run.objectives)
    seeds = f" x seeds {', '.join(map(str, cfg.run.seeds))}" if cfg.run.seeds else ""
    stages.append(("eval", "eval", f"{tasks} for {names}{seeds}", {}, False))
    demo = first_student(cfg, "cocomix")
    if demo is not None:
        stages.append(
            (
                "steer",
                "steer",
                f"inspect and sweep {cfg.steer.demo_scales} on {student_stage(demo.cfg)}",
                {},
                False,
            )
        )
    stages.append(("report", "report", "summary.json, report.md, loss_curves.png", {}, False))
    return stages


def _batch_text(p, block_size: int) -> str:
    if p.global_batch_blocks:
        tokens = p.max_steps * p.global_batch_blocks * block_size
        return f"{p.global_batch_blocks:,} blocks ({tokens:,} tokens)"
    return f"{p.batch_blocks * p.grad_accum:,} blocks per rank"


def _selected_steps(first: str | None, last: str | None) -> set[str]:
    for name, value in (("--from", first), ("--until", last)):
        if value is not None and value not in STEPS:
            raise ConfigError(f"{name} {value!r} is not a step; choose from {', '.join(STEPS)}.")
    start = STEPS.index(first) if first else 0
    stop = STEPS.index(last) if last else len(STEPS) - 1
    if start > stop:
        raise ConfigError(
            f"--from {first} comes after --until {last}; steps run in the order {', '.join(STEPS)}."
        )
    return set(STEPS[start : stop + 1])


def _state(run_dir: Path, step: str, stage: str, inputs: dict[str, Any]) -> tuple[str, str]:
    if step == "report":
        return "-", "run"
    if step == "eval":
        return "cached per model and task", "run"  # only what the cache lacks is scored
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


# --- the steps ---------------------------------------------------------------------------------------


def _prepare(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import prepare

    prepare.run(cfg, progress=progress)


def _train_sae(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import train_sae

    if train_sae.run(cfg, progress=progress).stopped is not None:  # SIGTERM / Ctrl-C: saved, resumable
        raise KeyboardInterrupt


def _extract(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import extract

    extract.run(cfg, progress=progress)


def _pretrain(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import pretrain

    (student,) = [s for s in students(cfg) if student_stage(s.cfg) == row.stage]
    result = pretrain.run(student.cfg, resume=True, progress=progress)
    if result.stopped is not None:  # SIGTERM / Ctrl-C: saved; the next `cocomix run` resumes
        raise KeyboardInterrupt


def _eval(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import evaluate

    evaluate.run(_eval_config(cfg), progress=progress)


def _eval_config(cfg: Config) -> Config:
    models = cfg.eval.models or [
        str(Path(cfg.run.dir) / stage / FINAL_MODEL) for stage in student_stages(cfg)
    ]
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, models=models))


def _steer(cfg: Config, row: PlannedStage, progress: bool) -> None:
    from pipelines.stages import steer

    steer.run(cfg)


def _report(cfg: Config, row: PlannedStage, progress: bool) -> dict[str, Any]:
    from pipelines.stages import report

    return report.write(cfg)


_RUNNERS: dict[str, Callable[[Config, PlannedStage, bool], Any]] = {
    "prepare": _prepare,
    "train-sae": _train_sae,
    "extract-concepts": _extract,
    "pretrain": _pretrain,
    "eval": _eval,
    "steer": _steer,
    "report": _report,
}

"""`eval`: models scored on perplexity and the paper's benchmarks, side by side, cached per model x task.

Runs in a `StageSession` like every stage: `eval/` is locked while it runs, and its manifest holds the
fingerprint of the models (by content), the tasks with the identity of their data, the limit and the
backend, and the results as its summary; an eval of the same inputs is up to date and does nothing. Unlike
the other stages, other inputs do not need `--force`: the outputs are a cache keyed by content, one file
per (model weights, task, data, limit) under `eval/cache/`, so a changed eval (another task, one more
model) scores only what the cache lacks, and an interrupted eval resumes at task granularity.

Writes `<run.dir>/eval/results.json` (every model x task with its metrics and standard errors) and, with
`log_samples`, one JSONL per model and task under `eval/samples/`. Task semantics: `pipelines.eval.tasks`;
their data: `pipelines.eval.data`; scoring: `pipelines.eval.metrics`. The `lm-eval` backend writes
`eval/results-lm-eval.json` instead, so that its numbers never replace the native ones that the report
reads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config.schema import Config
from pipelines.core.devices import resolve_device
from pipelines.core.files import atomic_write_json, read_json
from pipelines.core.fingerprints import fingerprint, input_files
from pipelines.core.layout import EVAL_RESULTS, EVAL_STAGE, MANIFEST, eval_results_path, seeded_student
from pipelines.core.session import StageResult, StageSession
from pipelines.data.token_store import open_prepared_tokens
from pipelines.errors import ConfigError, InputError
from pipelines.eval.data import (
    data_files,
    data_identity,
    declared_data_files,
    declared_examples,
    task_specs,
    unavailable_tasks,
)
from pipelines.eval.table import eval_table as eval_table  # re-exported: the CLI imports stages only
from pipelines.eval.tasks import PPL_TASK, is_text_perplexity

log = logging.getLogger(__name__)

CACHE = "cache"


@dataclass(frozen=True)
class ModelRef:
    label: str
    spec: str
    fingerprint: str


def run(cfg: Config, *, log_samples: bool = False, force: bool = False, progress: bool = True) -> StageResult:
    """Score every model of `eval.models` (default: the run's finished students) on every task."""
    e = cfg.eval
    device = resolve_device(e.device, "eval.device")  # a GPU this machine lacks: said before the stage starts
    models = _models(cfg)
    if e.backend == "lm-eval":
        if log_samples:
            raise ConfigError(
                "--log-samples writes the built-in backend's per-example files; drop it with "
                "--backend lm-eval."
            )
        text_tasks = [t for t in e.tasks if is_text_perplexity(t)]
        if text_tasks:
            raise ConfigError(
                f"The lm-eval backend cannot score {', '.join(f'`{t}`' for t in text_tasks)}: `ppl:` tasks "
                'are the native backend\'s (`eval.backend = "cocomix"`).'
            )
        tasks, skipped = list(e.tasks), {}
        declared = declared_data_files(cfg)
        local = set(declared) | _included_tasks(e.lmeval_include)
        _check_hub_for_lm_eval([t for t in tasks if t not in local])
        inputs = {"lm_eval": _lm_eval_version()}
        data = {task: data_identity(cfg, task, path) for task, path in declared.items()}
        files = input_files({"eval.lmeval_include": e.lmeval_include}) if e.lmeval_include else []
    else:
        specs = task_specs(cfg)
        unknown = [t for t in e.tasks if t not in specs and t != PPL_TASK and not is_text_perplexity(t)]
        if unknown:
            raise ConfigError(
                f"Unknown eval task(s) {', '.join(unknown)}; choose from {PPL_TASK}, {', '.join(specs)}, or "
                "declare one in `[eval.task.NAME]`."
            )
        paths = data_files(cfg)
        skipped = unavailable_tasks(cfg, paths)
        tasks = [t for t in e.tasks if t not in skipped]
        if not tasks:
            raise InputError(_no_task_left(skipped))
        for task, reason in skipped.items():
            log.warning("eval: skipping %s: %s", task, reason)
        inputs, files = {}, []
        data = {task: data_identity(cfg, task, paths.get(task)) for task in tasks}
    inputs.update(
        {
            "eval.backend": e.backend,
            "eval.tasks": tasks,
            # Which benchmarks are left out, and by which rule (the reasons come with it).
            "eval.missing_data": e.missing_data,
            "eval.skipped": sorted(skipped),
            "eval.limit": e.limit,
            "models": {m.label: m.fingerprint for m in models},
            "data": data,
        }
    )
    run_dir = Path(cfg.run.dir)
    with StageSession(run_dir, EVAL_STAGE, inputs, files, force=force, rerun_on_change=True) as session:
        # Scores come from the cache, but samples are only written when a task is scored: --log-samples
        # over cached scores scores the pairs whose samples are missing again (the same numbers).
        missing_samples = log_samples and _samples_missing(session.dir, models, tasks)
        if session.up_to_date and not missing_samples:
            return StageResult(EVAL_STAGE, session.dir, True, session.summary, session.fingerprint)
        started = time.monotonic()
        if e.backend == "lm-eval":
            table = _score_with_lm_eval(cfg, models, device, progress)
        else:
            table = _score(cfg, models, specs, data, paths, session.dir, device, log_samples, progress)
        results = {
            **({"backend": "lm-eval"} if e.backend == "lm-eval" else {}),
            "models": {m.label: {"spec": m.spec, "fingerprint": m.fingerprint} for m in models},
            "tasks": tasks,
            **(
                {} if e.backend == "lm-eval" else {"skipped_tasks": list(skipped), "skipped_reasons": skipped}
            ),
            "limit": e.limit,
            "results": table,
            "seconds": round(time.monotonic() - started, 3),
        }
        atomic_write_json(results_path(cfg), results)
        session.complete(results, outputs=[EVAL_RESULTS[e.backend]])
        return StageResult(EVAL_STAGE, session.dir, False, results, session.fingerprint)


def _no_task_left(skipped: dict[str, str]) -> str:
    """The one line of an eval whose every task was left out: which, why, and what gives them data."""
    by_reason: dict[str, list[str]] = {}
    for task, reason in skipped.items():
        by_reason.setdefault(reason, []).append(task)
    why = "; ".join(f"{', '.join(tasks)}: {reason}" for reason, tasks in by_reason.items())
    return (
        f"No eval task left to score ({why}). Give each its data with --data TASK=PATH (repeatable) or "
        "`eval.data_dir` (a folder in the benchmarks' own layout, as tests/data/eval), run where the hub "
        "is reachable, or add `ppl` to --tasks."
    )


def results_path(cfg: Config) -> Path:
    """The results file of `cfg.eval.backend`: each backend keeps its own."""
    return eval_results_path(cfg.run.dir, cfg.eval.backend)


def _score(
    cfg: Config,
    models: list[ModelRef],
    specs: dict,
    data: dict[str, Any],
    paths: dict[str, Path],
    stage_dir: Path,
    device,
    log_samples: bool,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """The native backend: each model x task from the cache, or scored now and cached. `data` holds each
    task's data identity (its files hashed once, in `run`), in the order the tasks run."""
    from pipelines.eval.metrics import task_metrics

    e = cfg.eval
    (stage_dir / CACHE).mkdir(exist_ok=True)
    table: dict[str, dict[str, Any]] = {}
    run_dir = Path(cfg.run.dir)
    # `ppl` reads the token store's val blocks: opened once, on first use (held against `prepare --force`
    # and verified then), and shared by every model.
    with contextlib.ExitStack() as reading:
        val_blocks = functools.cache(lambda: open_prepared_tokens(reading, run_dir)[0].split("val"))
        for model in models:
            scorer = None
            for task, data_id in data.items():
                key = fingerprint(
                    {"model": model.fingerprint, "task": task, "data": data_id, "limit": e.limit}
                )
                cache = stage_dir / CACHE / f"{key}.json"
                samples_path = (
                    _samples_path(stage_dir, model, task) if log_samples and _has_samples(task) else None
                )
                cached = read_json(cache)
                if cached is None or (samples_path is not None and not samples_path.exists()):
                    if scorer is None:
                        from pipelines.eval.scoring import ScoringModel

                        scorer = ScoringModel(model.spec, device, e.batch_size, progress=progress)
                    scorer.progress_label = f"{model.label} {task}"
                    t0 = time.monotonic()
                    metrics = task_metrics(
                        cfg, scorer, task, specs.get(task), paths.get(task), samples_path, val_blocks
                    )
                    metrics["seconds"] = round(time.monotonic() - t0, 3)
                    cached = {"model": model.spec, "task": task, "data": data_id, "limit": e.limit}
                    cached["metrics"] = metrics
                    atomic_write_json(cache, cached)
                    log.info("eval %s %s: %s", model.label, task, metrics)
                table.setdefault(model.label, {})[task] = cached["metrics"]
    return table


def _samples_path(stage_dir: Path, model: ModelRef, task: str) -> Path:
    return stage_dir / "samples" / model.label / f"{task}.jsonl"


def _has_samples(task: str) -> bool:
    """Benchmarks write per-example samples; perplexity tasks (`ppl`, `ppl:...`) have none."""
    return task != PPL_TASK and not is_text_perplexity(task)


def _samples_missing(stage_dir: Path, models: list[ModelRef], tasks: list[str]) -> bool:
    return any(not _samples_path(stage_dir, m, t).exists() for m in models for t in tasks if _has_samples(t))


def _score_with_lm_eval(
    cfg: Config, models: list[ModelRef], device, progress: bool
) -> dict[str, dict[str, Any]]:
    """Any lm-eval task, and the tasks declared in `[eval.task.NAME]`, on our models via
    `pipelines.eval.lmeval` (no cache: lm-eval owns the tasks). One `simple_evaluate` per model and task,
    so that the progress bar can say which task it is scoring."""
    from pipelines.eval.lmeval import cocomix_lm, run_task, task_manager

    e = cfg.eval
    declared = declared_examples(cfg)
    manager = task_manager(e.lmeval_include)
    table: dict[str, dict[str, Any]] = {}
    for model in models:
        lm = cocomix_lm(model.spec, device, e.batch_size, progress=progress)
        for task in e.tasks:
            lm.scorer.progress_label = f"{model.label} {task}"
            delimiter = e.task[task].delimiter if task in declared else ""
            reported = run_task(lm, task, declared.get(task), delimiter, e.limit, manager)
            log.info("eval (lm-eval) %s %s: %s", model.label, task, reported)
            table.setdefault(model.label, {}).update(reported)
    return table


def _included_tasks(include: str) -> set[str]:
    """The task names of `eval.lmeval_include`'s configs (`task: NAME` lines): they may read local files,
    so the hub probe leaves them to lm-eval, whose own load failure is one line too."""
    if not include:
        return set()
    names = set()
    for config in Path(include).rglob("*.yaml"):
        names.update(re.findall(r"^task:\s*(\S+)", config.read_text(encoding="utf-8"), re.M))
    return names


def _check_hub_for_lm_eval(hub_tasks: list[str]) -> None:
    """lm-eval loads its tasks' data from the hub: offline, one line now rather than retries and a
    traceback later (the native backend's `hub_or_skip` probe, asked before the stage starts)."""
    from pipelines.core.hub import hub_unreachable

    unreachable = hub_unreachable() if hub_tasks else None
    if unreachable is not None:
        raise InputError(
            f"The lm-eval backend loads {', '.join(hub_tasks)} from the HuggingFace hub, which is "
            f"unreachable ({unreachable}). Run where the hub is reachable, or declare the task with a local "
            "file in `[eval.task.NAME]`; the built-in backend (`--backend cocomix`) reads the paper's "
            "benchmarks from `eval.data_dir` or --data TASK=PATH."
        )


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from pipelines.eval.lmeval import NEEDS_LM_EVAL

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        raise ConfigError(NEEDS_LM_EVAL) from None


# --- the models -----------------------------------------------------------------------------------------


def _models(cfg: Config) -> list[ModelRef]:
    specs = list(cfg.eval.models)
    if not specs:
        run_dir = Path(cfg.run.dir)
        specs = [
            str(p.parent)
            for p in sorted(run_dir.glob("pretrain-*/model/config.json"))
            if (read_json(p.parent.parent / MANIFEST) or {}).get("status") == "complete"
        ]
        if not specs:
            raise InputError(
                f"No model to evaluate: {run_dir} has no finished `pretrain` stage. Pass --model PATH "
                "(repeatable; `hf:PATH_OR_ID` for transformers models) or run `cocomix pretrain`."
            )
    else:  # a run's student named without its seed is the run's first seed, as in every command
        specs = [
            spec if spec.startswith("hf:") else str(seeded_student(Path(spec), cfg.run.seeds))
            for spec in specs
        ]
    refs, labels = [], set()
    for spec in specs:
        label = _label(spec)
        while label in labels:
            label += "'"
        labels.add(label)
        refs.append(ModelRef(label, spec, _model_fingerprint(spec)))
    return refs


def _label(spec: str) -> str:
    if spec.startswith("hf:"):
        return spec
    path = Path(spec)
    return path.parent.name if path.name == "model" else path.name


def _model_fingerprint(spec: str) -> str:
    local = Path(spec[3:] if spec.startswith("hf:") else spec)
    if not local.exists():
        if spec.startswith("hf:"):
            return fingerprint({"hub": spec})
        raise InputError(f"Model `{spec}` does not exist. Pass a model folder or `hf:PATH_OR_ID`.")
    # By content and place in the folder, not by path: a run folder moved elsewhere keeps its eval cache.
    files = input_files({"model": str(local)})
    return fingerprint({f["name"]: f["sha256"] for f in files})

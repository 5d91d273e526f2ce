"""`eval`: models scored on perplexity and the paper's benchmarks, side by side, cached per model x task.

Writes `<run.dir>/eval/results.json` (every model x task with its metrics and standard errors), one cache
file per (model weights, task, data, limit) under `eval/cache/` (so a rerun is instant and an interrupted
eval resumes at task granularity), and with `log_samples` one JSONL per model and task under
`eval/samples/`. Task semantics: `pipelines.eval_tasks`; scoring: `pipelines.lm_scoring`. The `lm-eval`
backend writes `eval/results-lm-eval.json` instead, so that its numbers never replace the native ones
that the report reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import artifacts
from pipelines.config import Config
from pipelines.errors import ConfigError, InputError, first_line
from pipelines.stores import open_prepared_tokens

log = logging.getLogger(__name__)

STAGE = artifacts.EVAL_STAGE
RESULTS = artifacts.EVAL_RESULTS["cocomix"]
PPL_TASK = "ppl"


@dataclass(frozen=True)
class ModelRef:
    label: str
    spec: str
    fingerprint: str


def run(cfg: Config, *, log_samples: bool = False, progress: bool = True) -> dict[str, Any]:
    from pipelines.devices import resolve_device

    e = cfg.eval
    run_dir = Path(cfg.run.dir)
    if e.backend == "lm-eval":
        return _run_lm_eval(cfg, progress)
    tasks = task_specs(cfg)
    unknown = [t for t in e.tasks if t not in tasks and t != PPL_TASK]
    if unknown:
        raise ConfigError(
            f"Unknown eval task(s) {', '.join(unknown)}; choose from {PPL_TASK}, {', '.join(tasks)}, or "
            "declare one in `[eval.task.NAME]`."
        )
    data_files = _data_files(cfg)
    skipped = _unavailable_tasks(cfg, data_files)
    for task, reason in skipped.items():
        log.warning("eval: skipping %s: %s", task, reason)
    run_tasks = [t for t in e.tasks if t not in skipped]
    models = _models(cfg)
    stage_dir = run_dir / STAGE
    artifacts.ensure_run_dir(run_dir)
    (stage_dir / "cache").mkdir(parents=True, exist_ok=True)
    device = resolve_device(e.device)
    table: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    # `ppl` reads the token store's val blocks: opened once, on first use (held against `prepare --force`
    # and verified then), and shared by every model.
    with contextlib.ExitStack() as reading:
        val_blocks = functools.cache(lambda: open_prepared_tokens(reading, run_dir)[0].split("val"))
        for model in models:
            scorer = None
            for task in run_tasks:
                data_id = _data_identity(cfg, task, data_files.get(task))
                key = artifacts.fingerprint(
                    {"model": model.fingerprint, "task": task, "data": data_id, "limit": e.limit}
                )
                cache = stage_dir / "cache" / f"{key}.json"
                cached = artifacts.read_json(cache)
                if cached is None:
                    if scorer is None:
                        from pipelines.lm_scoring import ScoringModel

                        scorer = ScoringModel(model.spec, device, e.batch_size, progress=progress)
                    scorer.progress_label = f"{model.label} {task}"
                    samples_path = (
                        stage_dir / "samples" / model.label / f"{task}.jsonl" if log_samples else None
                    )
                    t0 = time.monotonic()
                    metrics = _evaluate_task(
                        cfg, scorer, tasks.get(task), data_files.get(task), samples_path, val_blocks
                    )
                    metrics["seconds"] = round(time.monotonic() - t0, 3)
                    cached = {
                        "model": model.spec,
                        "task": task,
                        "data": data_id,
                        "limit": e.limit,
                        "metrics": metrics,
                    }
                    artifacts.atomic_write_json(cache, cached)
                    log.info("eval %s %s: %s", model.label, task, metrics)
                table.setdefault(model.label, {})[task] = cached["metrics"]
    results = {
        "models": {m.label: {"spec": m.spec, "fingerprint": m.fingerprint} for m in models},
        "tasks": run_tasks,
        "skipped_tasks": list(skipped),
        "skipped_reasons": skipped,
        "limit": e.limit,
        "results": table,
        "seconds": round(time.monotonic() - started, 3),
    }
    previous = artifacts.read_json(stage_dir / RESULTS)
    if previous is not None and _same_results(previous, results):
        return previous  # everything came from the cache: leave the file as it was
    artifacts.atomic_write_json(stage_dir / RESULTS, results)
    return results


def _same_results(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def results_path(cfg: Config) -> Path:
    """The results file of `cfg.eval.backend`: each backend keeps its own."""
    return artifacts.eval_results_path(cfg.run.dir, cfg.eval.backend)


def _run_lm_eval(cfg: Config, progress: bool) -> dict[str, Any]:
    """Any lm-eval task, and the tasks declared in `[eval.task.NAME]`, on our models via
    `pipelines.lmeval_adapter` (no cache: lm-eval owns the tasks). One `simple_evaluate` per model and task,
    so that the progress bar can say which task it is scoring."""
    from pipelines.devices import resolve_device
    from pipelines.lmeval_adapter import cocomix_lm, task_manager

    e = cfg.eval
    declared = _declared_examples(cfg)
    models = _models(cfg)
    manager = task_manager(e.lmeval_include)
    started = time.monotonic()
    table: dict[str, dict[str, Any]] = {}
    for model in models:
        lm = cocomix_lm(model.spec, resolve_device(e.device), e.batch_size, progress=progress)
        for task in e.tasks:
            lm.scorer.progress_label = f"{model.label} {task}"
            reported = _lm_eval_task(cfg, lm, task, declared.get(task), manager)
            log.info("eval (lm-eval) %s %s: %s", model.label, task, reported)
            table.setdefault(model.label, {}).update(reported)
    results = {
        "backend": "lm-eval",
        "models": {m.label: {"spec": m.spec, "fingerprint": m.fingerprint} for m in models},
        "tasks": list(e.tasks),
        "limit": e.limit,
        "results": table,
        "seconds": round(time.monotonic() - started, 3),
    }
    artifacts.ensure_run_dir(Path(cfg.run.dir))
    results_path(cfg).parent.mkdir(exist_ok=True)
    artifacts.atomic_write_json(results_path(cfg), results)
    return results


def _declared_examples(cfg: Config) -> dict[str, list]:
    """The examples of each declared task that runs, built as the native backend builds them (its errors
    come before lm-eval starts)."""
    tasks = task_specs(cfg)
    return {
        name: _examples(tasks[name], path, cfg.eval.limit) for name, path in _declared_data_files(cfg).items()
    }


def _lm_eval_task(
    cfg: Config, lm: Any, task: str, examples: list | None, manager: Any
) -> dict[str, dict[str, Any]]:
    """One task through `lm_eval.simple_evaluate`: the metrics of each task lm-eval reports (a group's
    subtasks too), without lm-eval's `,filter` suffixes, with the number of examples scored."""
    import lm_eval

    from pipelines.lmeval_adapter import declared_task

    if examples is not None:
        spec: Any = declared_task(task, examples, cfg.eval.task[task].delimiter)
    else:
        spec = task
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=[spec], limit=cfg.eval.limit or None, task_manager=manager
        )
    except KeyError as exc:  # lm-eval's error for a task it does not know
        raise ConfigError(
            f"lm-eval does not know task {exc}; see `lm_eval --tasks list`, or declare it in "
            "`[eval.task.NAME]`."
        ) from None
    counts = output.get("n-samples", {})
    reported = {}
    for name, values in output["results"].items():
        metrics = {
            k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float)) and k != "alias"
        }
        if name in counts:
            metrics["examples"] = counts[name]["effective"]
        reported[name] = metrics
    return reported


# --- inputs ---------------------------------------------------------------------------------------------


def _models(cfg: Config) -> list[ModelRef]:
    specs = list(cfg.eval.models)
    if not specs:
        run_dir = Path(cfg.run.dir)
        specs = [
            str(p.parent)
            for p in sorted(run_dir.glob("pretrain-*/model/config.json"))
            if (artifacts.read_json(p.parent.parent / artifacts.MANIFEST) or {}).get("status") == "complete"
        ]
        if not specs:
            raise InputError(
                f"No model to evaluate: {run_dir} has no finished `pretrain` stage. Pass --model PATH "
                "(repeatable; `hf:PATH_OR_ID` for transformers models) or run `cocomix pretrain`."
            )
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
            return artifacts.fingerprint({"hub": spec})
        raise InputError(f"Model `{spec}` does not exist. Pass a model folder or `hf:PATH_OR_ID`.")
    # By content and place in the folder, not by path: a run folder moved elsewhere keeps its eval cache.
    files = artifacts.input_files({"model": str(local)})
    return artifacts.fingerprint({f["name"]: f["sha256"] for f in files})


def task_specs(cfg: Config) -> dict:
    """Built-in tasks and those declared in `[eval.task.NAME]`, by name."""
    from pipelines.eval_tasks import TASKS, custom_task

    clash = sorted(set(cfg.eval.task) & (set(TASKS) | {PPL_TASK}))
    if clash:
        raise ConfigError(f"`[eval.task.{clash[0]}]` has the name of a built-in task; rename it.")
    return {**TASKS, **{name: custom_task(name, spec) for name, spec in cfg.eval.task.items()}}


def _declared_data_files(cfg: Config) -> dict[str, Path]:
    """The data file of each declared task that runs; the others may point anywhere (a declared task whose
    file is missing must not block `--tasks other`)."""
    files: dict[str, Path] = {}
    for name, spec in cfg.eval.task.items():
        if name not in cfg.eval.tasks:
            continue
        if not Path(spec.data).is_file():
            raise InputError(
                f"`[eval.task.{name}]` data file {spec.data} does not exist. Point `data` at the task's "
                "jsonl/json file (a relative path is read next to the config file)."
            )
        files[name] = Path(spec.data)
    return files


def _data_files(cfg: Config) -> dict[str, Path]:
    from pipelines.eval_tasks import TASKS

    files = _declared_data_files(cfg)
    if cfg.eval.data_dir:
        root = Path(cfg.eval.data_dir)
        if not root.is_dir() and cfg.eval.missing_data == "hub":
            raise InputError(f"`eval.data_dir` {root} is not a folder.")
        for name, task in TASKS.items():
            if (root / task.local_file).exists():
                files[name] = root / task.local_file
    for item in cfg.eval.data:
        name, sep, path = item.partition("=")
        if not sep or name not in TASKS:
            raise ConfigError(
                f"`eval.data` entry {item!r} must be `task=PATH` with a task from {', '.join(TASKS)}."
            )
        if not Path(path).exists():
            raise InputError(f"Data file {path} for task `{name}` does not exist.")
        files[name] = Path(path)
    return files


def _unavailable_tasks(cfg: Config, data_files: dict[str, Path]) -> dict[str, str]:
    """Benchmarks left out of this eval, each with the reason: no local file under `missing_data = "skip"`;
    no local file and no hub dataset (unreachable, or not loadable) under `"hub_or_skip"`."""
    from pipelines.eval_tasks import TASKS
    from pipelines.hub import hub_unreachable

    missing = [t for t in cfg.eval.tasks if t not in data_files and t != PPL_TASK]
    if cfg.eval.missing_data == "hub" or not missing:
        return {}
    if cfg.eval.missing_data == "skip":
        return {t: "no local data (eval.missing_data = skip)" for t in missing}
    # One probe for all of them: offline, every hub load would retry for about 20 s before failing.
    unreachable = hub_unreachable()
    reasons = {}
    for task in missing:
        if unreachable is not None:
            reasons[task] = f"no local data and the hub is unreachable ({unreachable})"
            continue
        try:
            _hub_dataset(TASKS[task])  # fetched once into the datasets cache, read again when scored
        except _HubDataUnavailable as exc:
            reasons[task] = f"no local data and the hub dataset {TASKS[task].hub[0]} cannot be loaded ({exc})"
    return reasons


def _data_identity(cfg: Config, task: str, path: Path | None) -> Any:
    if task == PPL_TASK:
        manifest = artifacts.read_json(Path(cfg.run.dir) / "prepare" / artifacts.MANIFEST) or {}
        return {"prepare": manifest.get("fingerprint")}
    if path is None:
        from pipelines.eval_tasks import TASKS

        return {"hub": TASKS[task].hub}
    if task in cfg.eval.task:  # the declaration is part of the data's meaning
        return {
            "file": artifacts.file_identity(path)["sha256"],
            "spec": dataclasses.asdict(cfg.eval.task[task]),
        }
    paths = [path]
    if task in ("piqa", "social_iqa"):
        paths += sorted(path.parent.glob("*.lst"))
    return {p.name: artifacts.file_identity(p)["sha256"] for p in paths}


# --- tasks ----------------------------------------------------------------------------------------------


def _rows(task, path: Path | None, limit: int) -> list[dict]:
    if path is None:
        return _hub_rows(task, limit)
    rows = []
    for row in task.read(path):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    return rows


def _examples(task, path: Path | None, limit: int) -> list:
    examples = [task.build(row) for row in _rows(task, path, limit)]
    if not examples:
        raise InputError(f"Task `{task.name}` has no examples in {path or task.hub[0]}.")
    return examples


def _hub_rows(task, limit: int) -> list[dict]:
    try:
        dataset = _hub_dataset(task)
    except _HubDataUnavailable as exc:
        dataset_id, subset, split = task.hub
        raise InputError(
            f"No data for task `{task.name}`: the hub dataset {dataset_id} ({subset or 'default'}, {split}) "
            f"cannot be loaded ({exc}). Put the file at <eval.data_dir>/{task.local_file} or pass "
            f"--data {task.name}=PATH."
        ) from None
    return [dict(r) for r in (dataset.select(range(min(limit, len(dataset)))) if limit else dataset)]


class _HubDataUnavailable(Exception):
    """A hub dataset that cannot be read; the message is the first line of the underlying error."""


def _hub_dataset(task):
    dataset_id, subset, split = task.hub
    try:
        from datasets import load_dataset

        from pipelines.hub import quiet_hub

        with quiet_hub():
            return load_dataset(dataset_id, subset, split=split)
    except Exception as exc:  # offline, missing cache, renamed dataset: all "cannot read the data"
        raise _HubDataUnavailable(first_line(exc)[:200]) from None


def _evaluate_task(cfg: Config, scorer, task, path: Path | None, samples_path, val_blocks) -> dict:
    from pipelines.eval_tasks import mean_and_stderr, multiple_choice_scores

    if task is None:
        return _perplexity_on_val_blocks(cfg, scorer, val_blocks())
    examples = _examples(task, path, cfg.eval.limit)
    samples: list[dict] = []
    if task.kind == "rolling":
        lls = scorer.loglikelihood_rolling([ex["text"] for ex in examples])
        total = sum(lls)
        words, size = sum(ex["words"] for ex in examples), sum(ex["bytes"] for ex in examples)
        metrics = {
            "word_perplexity": math.exp(-total / words),
            "byte_perplexity": math.exp(-total / size),
            "bits_per_byte": -total / size / math.log(2),
        }
        samples = [{"doc": i, "loglikelihood": ll, "words": ex["words"], "bytes": ex["bytes"]}
                   for i, (ex, ll) in enumerate(zip(examples, lls, strict=True))]  # fmt: skip
    else:
        requests = [r for ex in examples for r in ex.requests()]
        scored = scorer.loglikelihood(requests)
        per_example, position = [], 0
        for index, ex in enumerate(examples):
            n = len(ex.requests())
            results = scored[position : position + n]
            position += n
            if task.kind == "lambada":
                scores = {"acc": float(results[0].is_greedy), "ll": results[0].loglikelihood}
            else:
                scores = multiple_choice_scores(ex, [r.loglikelihood for r in results])
            per_example.append(scores)
            samples.append(
                {
                    "doc": index,
                    "requests": ex.requests(),
                    "loglikelihoods": [r.loglikelihood for r in results],
                    "is_greedy": [r.is_greedy for r in results],
                    "gold": ex.gold,
                    **scores,
                }
            )
        metrics = {}
        for metric in task.metrics:
            if metric == "perplexity":
                metrics["perplexity"] = math.exp(-sum(s["ll"] for s in per_example) / len(per_example))
                continue
            value, stderr = mean_and_stderr([s[metric] for s in per_example])
            metrics[metric], metrics[f"{metric}_stderr"] = value, stderr
    metrics["examples"] = len(examples)
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write_bytes(samples_path, "".join(json.dumps(s) + "\n" for s in samples).encode())
    return metrics


def _perplexity_on_val_blocks(cfg: Config, scorer, val) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    blocks = val.shape[0] if not cfg.eval.limit else min(cfg.eval.limit, val.shape[0])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks, scorer.batch_size):
            ids = torch.from_numpy(val[start : min(start + scorer.batch_size, blocks)].astype(np.int64))
            ids = ids[:, : scorer.max_length].to(scorer.device)
            logits = scorer.forward(ids).float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}

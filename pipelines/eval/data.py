"""Where each eval task's examples come from: the built-in and declared tasks of a config, their local
files (`eval.data_dir`, `eval.data`, `[eval.task.NAME]`) or the hub, which are unavailable and why, and
the identity of each task's data (the eval cache key).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipelines.config.schema import Config
from pipelines.core.files import read_json
from pipelines.core.fingerprints import file_identity
from pipelines.core.layout import MANIFEST, PREPARE_STAGE
from pipelines.errors import ConfigError, InputError, first_line
from pipelines.eval.tasks import PPL_TASK, is_text_perplexity


def task_specs(cfg: Config) -> dict:
    """Built-in tasks and those declared in `[eval.task.NAME]`, by name."""
    from pipelines.eval.tasks import TASKS, custom_task

    clash = sorted(set(cfg.eval.task) & (set(TASKS) | {PPL_TASK}))
    if clash:
        raise ConfigError(f"`[eval.task.{clash[0]}]` has the name of a built-in task; rename it.")
    return {**TASKS, **{name: custom_task(name, spec) for name, spec in cfg.eval.task.items()}}


def declared_data_files(cfg: Config) -> dict[str, Path]:
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


def data_files(cfg: Config) -> dict[str, Path]:
    from pipelines.eval.tasks import TASKS

    files = declared_data_files(cfg)
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


def unavailable_tasks(cfg: Config, data_files: dict[str, Path]) -> dict[str, str]:
    """Benchmarks left out of this eval, each with the reason: no local file under `missing_data = "skip"`;
    no local file and no hub dataset (unreachable, or not loadable) under `"hub_or_skip"`."""
    from pipelines.core.hub import hub_unreachable
    from pipelines.eval.tasks import TASKS

    missing = [
        t for t in cfg.eval.tasks if t not in data_files and t != PPL_TASK and not is_text_perplexity(t)
    ]
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


def data_identity(cfg: Config, task: str, path: Path | None) -> Any:
    if is_text_perplexity(task):
        from pipelines.eval import text_perplexity

        return text_perplexity.data_identity(cfg, task)
    if task == PPL_TASK:
        manifest = read_json(Path(cfg.run.dir) / PREPARE_STAGE / MANIFEST) or {}
        return {"prepare": manifest.get("fingerprint")}
    if path is None:
        from pipelines.eval.tasks import TASKS

        return {"hub": TASKS[task].hub}
    if task in cfg.eval.task:  # the declaration is part of the data's meaning
        return {
            "file": file_identity(path)["sha256"],
            "spec": dataclasses.asdict(cfg.eval.task[task]),
        }
    paths = [path]
    if task in ("piqa", "social_iqa"):
        paths += sorted(path.parent.glob("*.lst"))
    return {p.name: file_identity(p)["sha256"] for p in paths}


def _rows(task, path: Path | None, limit: int) -> list[dict]:
    if path is None:
        return _hub_rows(task, limit)
    rows = []
    for row in task.read(path):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    return rows


def examples(task, path: Path | None, limit: int) -> list:
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

        from pipelines.core.hub import quiet_hub

        with quiet_hub():
            return load_dataset(dataset_id, subset, split=split)
    except Exception as exc:  # offline, missing cache, renamed dataset: all "cannot read the data"
        raise _HubDataUnavailable(first_line(exc)[:200]) from None


def declared_examples(cfg: Config) -> dict[str, list]:
    """The examples of each declared task that runs, built as the native backend builds them (its errors
    come before lm-eval starts)."""
    tasks = task_specs(cfg)
    return {
        name: examples(tasks[name], path, cfg.eval.limit) for name, path in declared_data_files(cfg).items()
    }

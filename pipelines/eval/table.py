"""An eval's results as the table `cocomix eval` prints: one column per student, its seeds grouped.

A run's students are folders `pretrain-<name>[-online]-seed<k>`: their seeds share a column named
`<name>[-online]` holding the mean ± sd over seeds (as `cocomix run` prints), with a row saying how many
seeds. A student with one seed shows its metric ± its standard error, and any other model (`hf:gpt2`, a
folder) keeps its own label, without `pretrain-`. `--json` keeps every model and seed; this is only the view.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipelines.core.stats import mean_and_spread
from pipelines.eval.tasks import main_metrics

_SEEDED = re.compile(r"^pretrain-(?P<student>.+)-seed(?P<seed>\d+)$")


@dataclass
class Column:
    header: str
    labels: list[str] = field(default_factory=list)
    """The results' model labels in this column: one per seed."""


def columns(labels: list[str]) -> list[Column]:
    """The models' labels grouped into columns, in first-seen order."""
    grouped: dict[str, Column] = {}
    for label in labels:
        seeded = _SEEDED.match(label)
        header = seeded["student"] if seeded else label.removeprefix("pretrain-")
        grouped.setdefault(header, Column(header)).labels.append(label)
    # A header that is also another model's own label (a folder named `cocomix`) keeps the full names.
    if any(c.header in labels and c.labels != [c.header] for c in grouped.values()):
        return [Column(label, [label]) for label in labels]
    return list(grouped.values())


def shown_metrics(task: str, metrics: dict[str, Any]) -> list[str]:
    """The metrics a results table shows for a task: its main ones (`MAIN_METRICS`), or for a declared or
    lm-eval task each number but the standard errors, which stand beside their metric, and the timing."""
    return main_metrics(task) or [
        k for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_stderr") and k != "seconds"
    ]


def eval_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(column headers, rows of (label, cells)) for `results["results"]` (model label -> task -> metrics)."""
    cols = columns(list(results))
    rows: list[tuple[str, list[str]]] = []
    if any(len(c.labels) > 1 for c in cols):
        rows.append(("seeds", [str(len(c.labels)) for c in cols]))
    tasks = list(dict.fromkeys(task for per_model in results.values() for task in per_model))
    for task in tasks:
        first = next(per_model[task] for per_model in results.values() if task in per_model)
        n = first.get("examples", first.get("tokens"))
        for metric in shown_metrics(task, first):
            cells = [_cell([results[label].get(task, {}) for label in c.labels], metric) for c in cols]
            rows.append((f"{task} {metric}" + (f" (n={n})" if n is not None else ""), cells))
    return [c.header for c in cols], rows


def _cell(per_seed: list[dict[str, Any]], metric: str) -> str:
    values = [m[metric] for m in per_seed if m.get(metric) is not None]
    if not values:
        return "-"
    if len(per_seed) == 1:
        stderr = per_seed[0].get(f"{metric}_stderr")
        return f"{values[0]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
    mean, sd = mean_and_spread(values)
    return f"{mean:.4f} ± {sd:.4f}" if sd is not None else f"{mean:.4f}"

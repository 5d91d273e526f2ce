"""The run's report, rebuilt from the stages' files: `summary.json`, `report.md` and `loss_curves.png`.

Everything in it comes from manifests, `metrics.jsonl`, `eval/results.json` (or the lm-eval backend's
`eval/results-lm-eval.json`) and `steer/demo.json`, so a run that was interrupted and resumed reports exactly
what an uninterrupted one does, apart from the wall times (kept under `wall_s` keys so that comparisons can
leave them out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.config.render import to_toml
from pipelines.config.schema import Config
from pipelines.core.files import atomic_write_bytes, read_json
from pipelines.core.layout import MANIFEST, eval_results_path, pretrain_stage
from pipelines.core.plot import line_chart
from pipelines.core.session import stage_states
from pipelines.eval.tasks import MAIN_METRICS

SUMMARY = "summary.json"
REPORT = "report.md"
LOSS_CURVES = "loss_curves.png"


def write(cfg: Config) -> dict[str, Any]:
    """Write the three files into the run folder and return the summary; unchanged text is not rewritten."""
    run_dir = Path(cfg.run.dir)
    summary = collect(cfg)
    line_chart(
        run_dir / LOSS_CURVES,
        loss_series(run_dir, cfg.run.objectives),
        x_label="optimizer step",
        y_label="loss (nats/token)",
        title="Next-token loss by step: train and validation, per student",
    )
    _write_if_changed(run_dir / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _write_if_changed(run_dir / REPORT, markdown(cfg, summary))
    return summary


def collect(cfg: Config) -> dict[str, Any]:
    run_dir = Path(cfg.run.dir)
    results = read_json(eval_results_path(run_dir, cfg.eval.backend)) or {"results": {}}
    objectives = {}
    for objective in cfg.run.objectives:
        manifest = (
            read_json(run_dir / pretrain_stage(objective) / MANIFEST) or {}
        )
        trained = manifest.get("summary", {}) if manifest.get("status") == "complete" else {}
        tasks = results["results"].get(pretrain_stage(objective), {})
        objectives[objective] = {
            "steps": trained.get("steps"),
            "tokens": trained.get("tokens"),
            "parameters": trained.get("parameters"),
            "val_loss": trained.get("val_loss"),
            "val_ppl": trained.get("val_ppl"),
            "tasks": {task: _main_metrics(task, metrics) for task, metrics in tasks.items()},
            "wall_s": manifest.get("elapsed_s"),
        }
    stages = {}
    for state in stage_states(run_dir):
        if state["status"] != "not started":
            stages[state["stage"]] = {"status": state["status"], "wall_s": state.get("elapsed_s")}
    if results.get("results"):
        stages["eval"] = {"status": "complete", "wall_s": results.get("seconds")}
    demo = read_json(run_dir / "steer" / "demo.json")
    return {
        "run_dir": str(run_dir),
        "objectives": objectives,
        "skipped_tasks": results.get("skipped_tasks", []),
        "skipped_reasons": results.get("skipped_reasons", {}),
        "stages": stages,
        "steering": [_demo_row(p) for p in demo["prompts"]] if demo else [],
        "loss_curves": str(run_dir / LOSS_CURVES),
    }


def skipped_notes(summary: dict[str, Any]) -> list[str]:
    """One line per reason: "hellaswag, piqa: no local data and the hub is unreachable (...)"."""
    by_reason: dict[str, list[str]] = {}
    for task in summary.get("skipped_tasks", []):
        reason = summary.get("skipped_reasons", {}).get(task, "no local data")
        by_reason.setdefault(reason, []).append(task)
    return [f"{', '.join(tasks)}: {reason}" for reason, tasks in by_reason.items()]


def without_wall_times(summary: Any) -> Any:
    """The summary minus every `wall_s`: what an interrupted and an uninterrupted run share."""
    if isinstance(summary, dict):
        return {k: without_wall_times(v) for k, v in summary.items() if k != "wall_s"}
    if isinstance(summary, list):
        return [without_wall_times(v) for v in summary]
    return summary


def markdown(cfg: Config, summary: dict[str, Any]) -> str:
    run_dir = Path(cfg.run.dir)
    lines = [f"# cocomix run `{run_dir}`", "", "## Students", ""]
    objectives = list(summary["objectives"])
    lines += ["| | " + " | ".join(objectives) + " |", "|---|" + "---:|" * len(objectives)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in student_table(summary)]
    if summary["skipped_tasks"]:
        lines += [""] + [f"Skipped {line}." for line in skipped_notes(summary)]
    lines += ["", f"![next-token loss by step, train and validation, per student]({LOSS_CURVES})", ""]
    lines += ["## Stages", "", "| stage | status | wall s |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {_fmt(s['wall_s'], 1)} |" for name, s in summary["stages"].items()]
    for demo in summary["steering"]:
        label = f" ({demo['label']})" if demo["label"] else ""
        lines += ["", f"## Steering: concept {demo['concept']}{label} on {demo['prompt']!r}", ""]
        lines += ["| setting | continuation |", "|---|---|"]
        lines += [f"| {run['setting']} | {_cell(run['text'])} |" for run in demo["runs"]]
    lines += ["", "## Config", "", "```toml", to_toml(cfg, with_docs=False).rstrip(), "```", ""]
    return "\n".join(lines)


def student_table(summary: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Rows (label, one cell per objective): val perplexity, each task's main metrics, tokens, wall time.

    The `ppl` task is the val perplexity again (over the same blocks), so it is not repeated."""
    rows = list(summary["objectives"].values())
    tasks = sorted({t for row in rows for t in row["tasks"]} - {"ppl"})
    table = [("val perplexity", [_fmt(r["val_ppl"], 2) for r in rows])]
    for task in tasks:
        for metric in MAIN_METRICS.get(task) or sorted({m for r in rows for m in r["tasks"].get(task, {})}):
            if metric.endswith("_stderr"):
                continue
            cells = []
            for r in rows:
                value, stderr = (
                    r["tasks"].get(task, {}).get(metric),
                    r["tasks"].get(task, {}).get(f"{metric}_stderr"),
                )
                cells.append(_fmt(value) + (f" ± {stderr:.4f}" if stderr is not None else ""))
            table.append((f"{task} {metric}", cells))
    table.append(("tokens", [f"{r['tokens']:,}" if r["tokens"] else "-" for r in rows]))
    table.append(("wall s", [_fmt(r["wall_s"], 1) for r in rows]))
    return table


def _main_metrics(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    keys = MAIN_METRICS.get(task) or [k for k, v in metrics.items() if isinstance(v, float)]
    out = {k: metrics[k] for k in keys if k in metrics}
    out.update({f"{k}_stderr": metrics[f"{k}_stderr"] for k in keys if f"{k}_stderr" in metrics})
    return out


def _demo_row(prompt: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": prompt["prompt"],
        "concept": prompt["concepts"][0],
        "label": prompt["label"],
        "runs": [{"setting": r["setting"], "text": r["text"]} for r in prompt["runs"]],
    }


def loss_series(run_dir: Path, objectives: list[str]) -> dict[str, list[tuple[float, float]]]:
    """The chart's lines, by legend label: "<objective> train" (the NTP part of the train loss, comparable
    across objectives) and "<objective> val" for each student; a student not trained yet has empty ones."""
    series = {}
    for objective in objectives:
        path = run_dir / pretrain_stage(objective) / "metrics.jsonl"
        text = path.read_text() if path.exists() else ""
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        series[f"{objective} train"] = [(r["step"], r["ntp_loss"]) for r in rows if r.get("kind") == "train"]
        series[f"{objective} val"] = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val"]
    return series


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())

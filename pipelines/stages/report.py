"""The run's report, rebuilt from the stages' files: `summary.json`, `report.md`, `loss_curves.png` and
`report.html` (the same as a page, with the forest plot of the paired differences; `pipelines/report/html`).

Everything in it comes from manifests, `metrics.jsonl`, `eval/results.json` (or the lm-eval backend's
`eval/results-lm-eval.json`) and `steer/demo.json` (and for the page, `concepts/dictionary.json` and the plan
its caller passes), so a run that was interrupted and resumed reports exactly what an uninterrupted one does,
apart from the wall times (kept under `wall_s` keys so that comparisons can leave them out).

Past 400 lines on purpose: the summary, `report.md` and the page are three views of one reading of the run
and share its tables and formatting (`student_table`, `skipped_notes`, `_fmt`); what is the page's alone,
its data types and template, lives in `pipelines/report/`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pipelines.config.render import to_toml
from pipelines.config.schema import Config
from pipelines.config.students import students
from pipelines.core.files import atomic_write_bytes, read_json
from pipelines.core.layout import (
    EVAL_STAGE,
    MANIFEST,
    STEER_DEMO,
    STEER_STAGE,
    eval_results_path,
    student_stage,
)
from pipelines.core.plot import (
    LOSS_AXES,
    Curve,
    Difference,
    draw_forest_plot,
    draw_loss_chart,
    loss_curves,
    write_loss_chart,
)
from pipelines.core.session import stage_states
from pipelines.core.stats import mean_and_spread, paired_difference, verdict
from pipelines.errors import ConfigError
from pipelines.eval.tasks import PPL_TASK, main_metrics
from pipelines.report import html
from pipelines.sae.dictionary import dictionary_path

SUMMARY = "summary.json"
REPORT = "report.md"
LOSS_CURVES = "loss_curves.png"
REPORT_HTML = "report.html"


class PlannedStage(Protocol):
    """A row of `cocomix run`'s plan (`pipelines.stages.workflow.PlannedStage`), which the caller passes:
    a stage does not import the workflow that chains the stages."""

    stage: str
    state: str
    action: str
    detail: str
    command: str


def write(cfg: Config, plan: Sequence[PlannedStage] = ()) -> dict[str, Any]:
    """Write the four files into the run folder and return the summary; unchanged text is not rewritten.
    `plan` is what `cocomix run` would do now, which the page shows beside each stage's state."""
    run_dir = Path(cfg.run.dir)
    summary = collect(cfg)
    curves = loss_series(run_dir, student_folders(cfg))
    several = any(curve.band for kinds in curves.values() for curve in kinds.values())
    title = (
        "Next-token loss by step, per student: mean of the seeds, min to max shaded"
        if several
        else "Next-token loss by step: train and validation, per student"
    )
    write_loss_chart(run_dir / LOSS_CURVES, curves, **LOSS_AXES, title=title)
    _write_if_changed(run_dir / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _write_if_changed(run_dir / REPORT, markdown(cfg, summary))
    loss_svg = draw_loss_chart(curves, **LOSS_AXES, title=title, image_format="svg")
    _write_if_changed(run_dir / REPORT_HTML, html.render(page(cfg, summary, loss_svg, plan)))
    return summary


def concept_page(cfg: Config, concept_id: int, plan: Callable[[], Sequence[PlannedStage]]) -> str:
    """`report.html#concept-ID`, the concept's page, for `cocomix concepts show ID --html`: the report is
    written first (with `plan()`) when its page lacks the concept (no page yet, or the dictionary built
    after it)."""
    path = Path(cfg.run.dir) / REPORT_HTML
    anchor = f"concept-{concept_id}"

    def on_page() -> bool:
        return f'id="{anchor}"' in (path.read_text(encoding="utf-8") if path.exists() else "")

    if not on_page():
        write(cfg, plan())
    if not on_page():
        raise ConfigError(
            f"Concept {concept_id} has no page in {path}: `report.max_concepts` "
            f"({cfg.report.max_concepts}) keeps the most often targeted only. Raise it (0 = all) and run "
            "this command again."
        )
    return f"{path}#{anchor}"


def page(
    cfg: Config, summary: dict[str, Any], loss_svg: bytes, plan: Sequence[PlannedStage] = ()
) -> html.Page:
    """What `report.html` shows, from the summary (the numbers formatted as `report.md` formats them)."""
    paired, differences = [], []
    for baseline, against in summary.get("paired_with", {}).items():
        for name, rows in against.items():
            for metric, d in rows.items():
                interval = tuple(d["ci95"]) if d["ci95"] else None
                differences.append(
                    Difference(f"{name} - {baseline}", metric, d["mean"], interval, d["verdict"])
                )
                paired.append(
                    html.PairedRow(
                        baseline=baseline,
                        student=name,
                        metric=metric,
                        difference=f"{d['mean']:+.4f}",
                        interval=f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "-",
                        seeds=", ".join(map(str, d["seeds"])),
                        verdict=d["verdict"],
                    )
                )
    forest = draw_forest_plot(differences, title="Paired differences: mean and 95% interval over seeds")
    dictionary = read_json(dictionary_path(Path(cfg.run.dir))) or {}  # `cocomix concepts build`'s
    # The demo file has what the summary leaves out: the student's top concepts after each prompt token.
    demo_file = read_json(Path(cfg.run.dir) / STEER_STAGE / STEER_DEMO) or {"prompts": []}
    steering = [
        _steering_demo(demo, prompt.get("inspect", []))
        for demo, prompt in zip(summary["steering"], demo_file["prompts"], strict=True)
    ]
    concepts = html.concepts_of(dictionary, steering)  # the most often targeted first
    return html.Page(
        title=f"cocomix run {Path(cfg.run.dir)}",
        students=list(summary["objectives"]),
        student_rows=student_table(summary),
        paired=paired,
        forest_svg=html.inline_svg(forest) if differences else "",
        loss_svg=html.inline_svg(loss_svg),
        speed_rows=[
            _speed_row(Path(cfg.run.dir), name, folders, summary["objectives"][name].get("wall_s"))
            for name, folders in student_folders(cfg).items()
        ],
        skipped=skipped_notes(summary),
        stages=_stage_rows(Path(cfg.run.dir), summary["stages"], plan),
        steering=steering,
        config_toml=to_toml(cfg, with_docs=False).rstrip(),
        summary=summary,
        concepts=concepts[: cfg.report.max_concepts or None],
        concepts_left_out=len(concepts) - len(concepts[: cfg.report.max_concepts or None]),
        concept_tokens=dictionary.get("tokens", 0),
    )


def _speed_row(
    run_dir: Path, name: str, folders: dict[int, str], wall_s: float | None
) -> tuple[str, str, str, str]:
    """A student's tokens/s and MFU (the median over its seeds, from their manifests: timings, like wall
    times, are left out of the summary, which an interrupted run must reproduce) and its seeds' wall time."""
    trained = [
        (read_json(run_dir / folder / MANIFEST) or {}).get("summary", {}) for folder in folders.values()
    ]
    speeds = [t["tokens_per_s"] for t in trained if t.get("tokens_per_s") is not None]
    mfus = [t["mfu"] for t in trained if t.get("mfu") is not None]
    speed = f"{statistics.median(speeds):,.0f}" if speeds else "-"
    mfu = f"{statistics.median(mfus):.1%}" if mfus else "- (a GPU of known peak only)"
    return name, speed, mfu, _fmt(wall_s, 1)


def _stage_rows(
    run_dir: Path, states: dict[str, dict[str, Any]], plan: Sequence[PlannedStage]
) -> list[html.StageRow]:
    """The plan's stages in run order, then any other stage folder the run holds (a student no longer in
    `run.objectives`), each with its state, wall time and what `cocomix run` would do with it now."""
    rows = []
    for planned in plan:
        # A stage without a state of its own (the report, rebuilt each time) has none to show.
        unstated = "-" if planned.state == "-" else "not started"
        state = states.get(planned.stage, {"status": unstated, "wall_s": None})
        action = planned.action
        if planned.state not in (state["status"], "-"):  # e.g. "cached per model and task", a refusal's why
            action += f" ({planned.state})"
        rows.append(_stage_row(run_dir, planned.stage, state, planned.detail, action, planned.command))
    planned_stages = {planned.stage for planned in plan}
    for name, state in states.items():
        if name not in planned_stages:
            rows.append(
                _stage_row(run_dir, name, state, "", "- (not in this config's plan)" if plan else "", "")
            )
    return rows


def _stage_row(
    run_dir: Path, name: str, state: dict[str, Any], detail: str, action: str, command: str
) -> html.StageRow:
    """A stage as the page lists it, with the settings its fingerprint holds (from its manifest)."""
    manifest = read_json(run_dir / name / MANIFEST) or {}
    settings = [(key, json.dumps(value)) for key, value in sorted(manifest.get("inputs", {}).items())]
    wall = _fmt(state["wall_s"], 1)
    linked = (run_dir / name).is_dir()
    return html.StageRow(name, state["status"], wall, settings, detail, action, command, linked)


def _steering_demo(demo: dict[str, Any], inspect: list[dict[str, Any]]) -> dict[str, Any]:
    """A demo as the page shows it: each run with `same` (its text is the unsteered one); `unchanged`
    (every steered continuation equals the unsteered one); the student's top concepts after each prompt
    token (`inspect`) and where among them the swept concept is (`tokens`, `ranked`, `last_rank`), which
    is what the page says when steering changed nothing."""
    unsteered = next((run["text"] for run in demo["runs"] if run["setting"] == "unsteered"), None)
    runs = [
        {**run, "same": run["setting"] != "unsteered" and run["text"] == unsteered} for run in demo["runs"]
    ]
    steered = [run for run in runs if run["setting"] != "unsteered"]
    tokens = html.prompt_tokens(inspect, demo["concept"])
    return {
        **demo,
        "runs": runs,
        "unchanged": bool(steered) and all(run["same"] for run in steered),
        "inspect": inspect,
        "top_n": max((len(row["concepts"]) for row in inspect), default=0),
        "tokens": tokens,
        "ranked": sum(1 for t in tokens if t.rank),
        "last_rank": tokens[-1].rank if tokens else None,
    }


def student_folders(cfg: Config) -> dict[str, dict[int, str]]:
    """Each name of `run.objectives`: its pretrain folder per seed (`run.seed` when `run.seeds` is empty)."""
    folders: dict[str, dict[int, str]] = {}
    for student in students(cfg):
        seed = student.seed if student.seed is not None else cfg.run.seed
        folders.setdefault(student.name, {})[seed] = student_stage(student.cfg)
    return folders


def collect(cfg: Config) -> dict[str, Any]:
    run_dir = Path(cfg.run.dir)
    results = read_json(eval_results_path(run_dir, cfg.eval.backend)) or {"results": {}}
    by_name = student_folders(cfg)
    objectives = {}
    for name, folders in by_name.items():
        per_seed = {seed: _student(run_dir, folder, results) for seed, folder in folders.items()}
        objectives[name] = _over_seeds(per_seed)
    stages = {}
    for state in stage_states(run_dir):
        if state["status"] != "not started":
            stages[state["stage"]] = {"status": state["status"], "wall_s": state.get("elapsed_s")}
    if results.get("results"):
        stages[EVAL_STAGE] = {"status": "complete", "wall_s": results.get("seconds")}
    demo = read_json(run_dir / STEER_STAGE / STEER_DEMO)
    return {
        "run_dir": str(run_dir),
        "seeds": sorted({seed for folders in by_name.values() for seed in folders}),
        "objectives": objectives,
        "paired_with": _paired_with(objectives, cfg.run.baselines),
        "skipped_tasks": results.get("skipped_tasks", []),
        "skipped_reasons": results.get("skipped_reasons", {}),
        "stages": stages,
        "steering": [_demo_row(p) for p in demo["prompts"]] if demo else [],
        "loss_curves": str(run_dir / LOSS_CURVES),
    }


def _student(run_dir: Path, folder: str, results: dict[str, Any]) -> dict[str, Any]:
    """One trained student (one seed): its training summary and its main eval metrics."""
    manifest = read_json(run_dir / folder / MANIFEST) or {}
    trained = manifest.get("summary", {}) if manifest.get("status") == "complete" else {}
    tasks = results["results"].get(folder, {})
    return {
        "stage": folder,
        "steps": trained.get("steps"),
        "tokens": trained.get("tokens"),
        "parameters": trained.get("parameters"),
        "val_loss": trained.get("val_loss"),
        "val_ppl": trained.get("val_ppl"),
        "tasks": {task: _main_metrics(task, metrics) for task, metrics in tasks.items()},
        "wall_s": manifest.get("elapsed_s"),
    }


COMPARED = ("val_ppl", "val_loss")  # besides each task's main metrics


def _over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A name's students over its seeds: the mean of each metric (over the trained seeds) with its spread
    (sample sd, None for one seed), and every seed's own numbers under `seeds`."""
    trained = {seed: r for seed, r in per_seed.items() if r["val_ppl"] is not None}
    first = next(iter(trained.values()), next(iter(per_seed.values())))
    out: dict[str, Any] = {k: first[k] for k in ("steps", "tokens", "parameters")}
    spread: dict[str, Any] = {"tasks": {}}
    for key in COMPARED:
        out[key], spread[key] = mean_and_spread([r[key] for r in trained.values()])
    out["tasks"] = {}
    for task in dict.fromkeys(t for r in trained.values() for t in r["tasks"]):
        metrics = dict.fromkeys(m for r in trained.values() for m in r["tasks"].get(task, {}))
        for metric in metrics:
            values = [
                r["tasks"][task][metric] for r in trained.values() if metric in r["tasks"].get(task, {})
            ]
            if len(trained) == 1 or metric.endswith("_stderr"):  # one seed: its stderr stands
                out["tasks"].setdefault(task, {})[metric] = values[0] if len(values) == 1 else None
                continue
            mean, sd = mean_and_spread(values)
            out["tasks"].setdefault(task, {})[metric] = mean
            spread["tasks"].setdefault(task, {})[metric] = sd
    walls = [r["wall_s"] for r in per_seed.values() if r["wall_s"] is not None]
    out["wall_s"] = sum(walls) if walls else None  # the time all its seeds took
    out["n_seeds"] = len(trained)
    out["spread"] = spread
    out["seeds"] = {str(seed): r for seed, r in per_seed.items()}
    return out


def comparisons(names: list[str], baselines: list[str]) -> list[tuple[str, str]]:
    """(student, baseline) pairs: every student against each baseline it trains with, in `baselines` order;
    a pair already compared the other way round (`kd` against `ntp`, then `ntp` against `kd`) only once."""
    pairs: list[tuple[str, str]] = []
    for baseline in dict.fromkeys(b for b in baselines if b in names):
        pairs += [(n, baseline) for n in names if n != baseline and (baseline, n) not in pairs]
    return pairs


def _paired_with(objectives: dict[str, Any], baselines: list[str]) -> dict[str, Any]:
    """`{baseline: {student: {metric: difference}}}`: each student's paired difference from each baseline
    (same seed) on every compared metric, with the 95% t-interval and a verdict."""

    def by_seed(name: str, pick) -> dict[int, float]:
        return {int(seed): v for seed, r in objectives[name]["seeds"].items() if (v := pick(r)) is not None}

    paired: dict[str, Any] = {}
    for name, baseline in comparisons(list(objectives), baselines):
        rows = {}
        metrics = [(key, None, key) for key in COMPARED]
        for task, values in objectives[name]["tasks"].items():
            if task == PPL_TASK:  # the val blocks again: `val_ppl`
                continue
            metrics += [
                (metric, task, f"{task} {metric}") for metric in values if not metric.endswith("_stderr")
            ]
        for metric, task, label in metrics:

            def pick(r, metric=metric, task=task):
                return r[metric] if task is None else r["tasks"].get(task, {}).get(metric)

            difference = paired_difference(by_seed(name, pick), by_seed(baseline, pick))
            if difference is not None:
                difference["verdict"] = verdict(difference, lower_is_better=_lower_is_better(metric))
                rows[label] = difference
        paired.setdefault(baseline, {})[name] = rows
    return paired


def _lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("ppl", "perplexity", "loss", "bits_per_byte"))


def paired_lines(summary: dict[str, Any], metrics: tuple[str, ...] | None = None) -> list[str]:
    """One line per student and metric: `cocomix - ntp, val_ppl: +11.90, 95% CI [-10.05, +33.85] over
    seeds 0, 1, 2 (not decided ...)`; with one seed, the difference and why there is no interval."""
    lines = []
    for baseline, against in summary.get("paired_with", {}).items():
        for name, rows in against.items():
            for label, d in rows.items():
                if metrics is not None and not any(label == m or label.startswith(f"{m} ") for m in metrics):
                    continue
                seeds = ", ".join(map(str, d["seeds"]))
                if d["ci95"] is None:
                    lines.append(
                        f"{name} - {baseline}, {label}: {d['mean']:+.2f} (seed {seeds} only: one seed gives "
                        "no interval; set `run.seeds`)"
                    )
                    continue
                low, high = d["ci95"]
                lines.append(
                    f"{name} - {baseline}, {label}: {d['mean']:+.2f}, 95% CI [{low:+.2f}, {high:+.2f}] over "
                    f"seeds {seeds}: {name} {d['verdict']}"
                )
    return lines


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
    lines += _paired_markdown(summary)
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


def _paired_markdown(summary: dict[str, Any]) -> list[str]:
    lines = []
    for baseline, against in summary.get("paired_with", {}).items():
        lines += ["", f"## Against `{baseline}`, paired by seed", ""]
        lines += [
            f"Each student minus `{baseline}` trained with the same seed (the same data order), over the "
            "seeds both have: the mean difference and its 95% t-interval (n - 1 degrees of freedom).",
            "",
        ]
        lines += [
            "| student | metric | difference | 95% CI | seeds | verdict |",
            "|---|---|---:|---|---|---|",
        ]
        for name, rows in against.items():
            for label, d in rows.items():
                interval = f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else "-"
                seeds = ", ".join(map(str, d["seeds"]))
                lines.append(
                    f"| {name} | {label} | {d['mean']:+.4f} | {interval} | {seeds} | {d['verdict']} |"
                )
    return lines


def student_table(summary: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Rows (label, one cell per objective): val perplexity, each task's main metrics, tokens, wall time.

    The `ppl` task is the val perplexity again (over the same blocks), so it is not repeated."""
    rows = list(summary["objectives"].values())
    tasks = sorted({t for row in rows for t in row["tasks"]} - {"ppl"})
    several = any(r.get("n_seeds", 1) > 1 for r in rows)
    table = []
    if several:
        table.append(("seeds", [str(r["n_seeds"]) for r in rows]))
    cells = [_fmt(r["val_ppl"], 2) + _spread(r.get("spread", {}).get("val_ppl"), 2) for r in rows]
    table.append(("val perplexity" + (" (mean ± sd)" if several else ""), cells))
    for task in tasks:
        for metric in main_metrics(task) or sorted({m for r in rows for m in r["tasks"].get(task, {})}):
            if metric.endswith("_stderr"):
                continue
            cells = []
            for r in rows:
                value, stderr = (
                    r["tasks"].get(task, {}).get(metric),
                    r["tasks"].get(task, {}).get(f"{metric}_stderr"),
                )
                sd = r.get("spread", {}).get("tasks", {}).get(task, {}).get(metric)
                cells.append(_fmt(value) + (f" ± {stderr:.4f}" if stderr is not None else _spread(sd, 4)))
            table.append((f"{task} {metric}", cells))
    table.append(("tokens", [f"{r['tokens']:,}" if r["tokens"] else "-" for r in rows]))
    table.append(("wall s", [_fmt(r["wall_s"], 1) for r in rows]))
    return table


def _spread(sd: float | None, digits: int) -> str:
    return f" ± {sd:.{digits}f}" if sd is not None else ""


def _main_metrics(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    keys = main_metrics(task) or [k for k, v in metrics.items() if isinstance(v, float)]
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


def loss_series(run_dir: Path, folders: dict[str, dict[int, str]]) -> dict[str, dict[str, Curve]]:
    """Each student's curves by kind: `train` (the NTP part of the train loss, comparable across objectives)
    and `val`. One seed: its points, no band. Several: the mean over the seeds at each step they all logged,
    and a (step, min, max) band; a name not trained yet has curves without points."""
    students = {}
    for name, by_seed in folders.items():
        curves = [loss_curves(_rows(run_dir / folder / "metrics.jsonl")) for folder in by_seed.values()]
        if len(by_seed) == 1:
            students[name] = curves[0]
            continue
        students[name] = {}
        for kind in ("train", "val"):
            runs = [dict(c[kind].points) for c in curves if c[kind].points]
            steps = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
            students[name][kind] = Curve(
                [(step, statistics.fmean(r[step] for r in runs)) for step in steps],
                [(step, min(r[step] for r in runs), max(r[step] for r in runs)) for step in steps],
            )
    return students


def _rows(path: Path) -> list[dict[str, Any]]:
    """A training log's rows; none for a student not trained yet."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())

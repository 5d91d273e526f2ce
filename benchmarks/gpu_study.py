"""The GPU study as a benchmark: `configs/gpu-study.toml` sized from a time budget, run, and its students'
tokens/s and MFU printed beside the report's table.

    python benchmarks/gpu_study.py                    # Shakespeare (repeated), 8 minutes on one H200
    python benchmarks/gpu_study.py --regime imdb      # IMDb reviews, no token seen twice
    python benchmarks/gpu_study.py --plan             # the sizing and the command; runs nothing
    python benchmarks/gpu_study.py --report RUN_DIR   # the tables of a finished (or partial) run

Everything the study computes is `cocomix run --config configs/gpu-study.toml` (with `--set
run.profile=imdb` for the second regime): the plan, the seeds, the students, the statistics and the report.
This script adds only what a benchmark needs: the step count for a budget (`--minutes`; the config's own
sizes are this script's for 8 minutes, a test keeps them equal), a deadline (SIGTERM at `--timeout-minutes`:
students save a checkpoint and the same command resumes), and after the run a table of the measured speeds
against the assumed ones, with the steps that would have filled the budget at the measured speeds.
`<run.dir>/gpu_study.json` keeps the numbers, the command and the commit.

The sizing model (seconds for one regime, `S` students x `n` seeds, `T` tokens per student):
    upstream   = loading + sae_tokens / sae_speed + extracted / extract_speed
    students   = S x first_seed + S x (n - 1) x later_seed + S x n x eval_per_student
    training   = n x T x sum over students of 1 / speed(objective)
    T          = SAFETY x (budget - upstream - students) / (n x sum 1/speed) in whole steps,
where `extracted` is the corpus for Shakespeare (every train token, whatever T) and 1.03 T / (1 - val share)
for IMDb (extraction covers what the students read, so T enters the upstream term too). Both regimes get
the smaller of their two step counts, so that they differ only in whether tokens repeat. Speeds and
costs: `ASSUMED` below; what nothing measured is marked there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the report's table is the library's

from pipelines.config.loading import load_config  # noqa: E402
from pipelines.config.students import students  # noqa: E402
from pipelines.core.layout import student_stage  # noqa: E402
from pipelines.errors import ConfigError  # noqa: E402
from pipelines.stages.report import collect, paired_lines, student_table  # noqa: E402

CONFIG = REPO / "configs" / "gpu-study.toml"
REGIMES = ("shakespeare", "imdb")
RESULT_FILE = "gpu_study.json"
UPSTREAM_STAGES = ("prepare", "train-sae", "extract-concepts")
DEFAULT_MINUTES = 8.0  # the budget the config's own sizes fill
SAFETY = 0.9  # the share of the time left after the fixed costs that the step count plans to fill
SHAKESPEARE_TRAIN_TOKENS = 1_465_344  # `cocomix prepare` of the config: 1,495,862 tokens, 29 val blocks


@dataclass(frozen=True)
class Assumptions:
    """Speeds (tokens/s) and fixed costs (s) on one H200. Measured there at 627b520 (torch 2.11, float32
    teacher, bf16 compiled students of 32 x 1,024 tokens per micro-step; docs/BENCHMARKS.md): NTP, CoCoMix,
    extraction, train-sae. Assumed, never measured: the rest."""

    ntp: float = 514_000
    cocomix: float = 350_000
    kd: float = 450_000  # assumed: NTP's step plus a top-32 KL, read from the store
    pause: float = 400_000  # assumed; the study trains no pause student
    extract: float = 43_000
    sae: float = 83_000
    loading_s: float = 55.0  # assumed: imports, tokenizer and two teacher loads, SAE evaluations, writes
    first_seed_s: float = 45.0  # assumed: a student's cold torch.compile, evaluations, its save and export
    later_seed_s: float = 8.0  # assumed: later seeds reuse the compiled step in the same process
    eval_s: float = 3.0  # assumed: the eval stage per student (three perplexity texts)

    def speed(self, objective: str) -> float:
        return getattr(self, objective)


ASSUMED = Assumptions()


@dataclass(frozen=True)
class Sizing:
    steps: int
    tokens_per_step: int
    tokens_per_student: int
    max_tokens: int  # `data.max_tokens` for the fresh-data regime; 0 for Shakespeare
    seconds: dict[str, float]  # the model's estimate, per term


def size(cfg, regime: str, minutes: float, a: Assumptions = ASSUMED, steps: int | None = None) -> Sizing:
    """The steps per student that fill `minutes` for the students and seeds of `cfg` (see the docstring),
    and the seconds each term takes; with `steps` given, the seconds of that many."""
    trained = students(cfg)
    names = {s.name for s in trained}
    seeds = len(trained) // len(names)
    per_token = sum(1 / a.speed(s.cfg.pretrain.objective) for s in trained)  # seconds per token per student
    tokens_per_step = cfg.pretrain.global_batch_blocks * cfg.data.block_size
    fixed = {
        "loading": a.loading_s,
        "train-sae": cfg.sae.train_tokens / a.sae,
        "students' fixed costs": len(names) * (a.first_seed_s + (seeds - 1) * a.later_seed_s),
        "eval": len(trained) * a.eval_s,
    }
    fresh = regime == "imdb"
    if not fresh:
        fixed["extract-concepts"] = SHAKESPEARE_TRAIN_TOKENS / a.extract
    extract_per_token = 1 / ((1 - cfg.data.val_fraction) * a.extract) if fresh else 0.0
    if steps is None:
        left = SAFETY * (60 * minutes - sum(fixed.values()))
        steps = max(1, math.floor(left / (per_token + extract_per_token) / tokens_per_step))
    tokens = steps * tokens_per_step
    seconds = {**fixed, "training": per_token * tokens}
    max_tokens = 0
    if fresh:  # a cap that holds `tokens` train tokens after the val documents (chosen by hash: 3% slack)
        max_tokens = math.ceil(1.03 * tokens / (1 - cfg.data.val_fraction) / 10_000) * 10_000
        seconds["extract-concepts"] = max_tokens / a.extract
    return Sizing(steps, tokens_per_step, tokens, max_tokens, seconds)


def budget_sizing(args: argparse.Namespace, a: Assumptions = ASSUMED) -> Sizing:
    """The regime's sizing at the step count both regimes fit in `--minutes`: equal tokens per student, so
    that the regimes differ only in whether tokens repeat."""
    steps = min(size(study_config(args, regime=r), r, args.minutes, a).steps for r in REGIMES)
    return size(study_config(args), args.regime, args.minutes, a, steps=steps)


def study_config(args: argparse.Namespace, sets: list[str] = (), regime: str | None = None):
    """The config as `cocomix run` will read it: the regime's profile, then the user's --set."""
    profile = ["run.profile=imdb"] if (regime or args.regime) == "imdb" else []
    return load_config(CONFIG, [*profile, *args.overrides, *sets])


def sizing_sets(args: argparse.Namespace, sizing: Sizing) -> list[str]:
    """The --set values a budget other than the config's adds; none for the config's own 8 minutes."""
    if args.minutes == DEFAULT_MINUTES:
        return []
    base = study_config(args)
    sets = [f"pretrain.max_steps={sizing.steps}", f"run.dir={base.run.dir}-{args.minutes:g}min"]
    if sizing.max_tokens:
        sets.append(f"data.max_tokens={sizing.max_tokens}")
    return sets


def cocomix_command(args: argparse.Namespace, sets: list[str]) -> list[str]:
    command = [sys.executable, "-m", "cocomix_cli", "--no-progress", "--config", str(CONFIG)]
    if args.regime == "imdb":
        command += ["--set", "run.profile=imdb"]
    for item in [*args.overrides, *sets]:
        command += ["--set", item]
    return [*command, "run"]


def run_until(command: list[str], minutes: float) -> int:
    """Run `cocomix run` (its output passes through); past the deadline, SIGTERM (each student saves a
    checkpoint; the same command resumes), SIGKILL two minutes later. Its exit code, 124 on the deadline."""
    print("$ " + shlex.join(["python", *command[1:]]), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
    }
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return process.wait(timeout=60 * minutes)
    except subprocess.TimeoutExpired:
        print(
            f"gpu_study: {minutes:g} minutes passed; stopping (rerun the command to resume)", file=sys.stderr
        )
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return 124
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        raise


# --- reading a run -----------------------------------------------------------------------------------


def _manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / stage / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measured(cfg) -> dict[str, Any]:
    """Per student name, over its finished seeds: median tokens/s and MFU of the logged train windows (the
    window that holds `torch.compile` is one of many), and the seconds besides training of its first and
    later seeds; per upstream stage, its wall time."""
    run_dir = Path(cfg.run.dir)
    by_name: dict[str, list] = {}
    for student in students(cfg):
        by_name.setdefault(student.name, []).append(student)
    out: dict[str, Any] = {"students": {}, "stages": {}}
    for name, seeds in by_name.items():
        speeds, mfus, fixed = [], [], []
        for student in seeds:
            stage = student_stage(student.cfg)
            manifest = _manifest(run_dir, stage)
            if manifest.get("status") != "complete":
                continue
            rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in rows if r.get("kind") == "train" and r.get("tokens_per_s")]
            speed = _median([r["tokens_per_s"] for r in train])
            speeds.append(speed)
            mfus += [r["mfu"] for r in train if r.get("mfu") is not None]
            fixed.append(manifest["elapsed_s"] - manifest["summary"]["tokens"] / speed)
        out["students"][name] = {
            "objective": seeds[0].cfg.pretrain.objective,
            "seeds": len(speeds),
            "tokens_per_s": _median(speeds),
            "mfu": _median(mfus),
            "first_seed_s": fixed[0] if fixed else None,
            "later_seed_s": _median(fixed[1:]),
        }
    for stage in UPSTREAM_STAGES:
        manifest = _manifest(run_dir, stage)
        out["stages"][stage] = manifest.get("elapsed_s")
        if stage == "prepare":
            out["train_tokens"] = manifest.get("summary", {}).get("train_tokens")
    return out


def measured_assumptions(cfg, numbers: dict[str, Any], a: Assumptions = ASSUMED) -> Assumptions:
    """`a` with what the run measured in its place: each objective's speed, the students' fixed costs, the
    SAE's and the extraction's tokens/s (their stages' wall times, teacher loading included, so `loading`
    keeps only prepare's)."""
    changes: dict[str, float] = {}
    for row in numbers["students"].values():
        if row["tokens_per_s"]:
            changes[row["objective"]] = row["tokens_per_s"]
        for key in ("first_seed_s", "later_seed_s"):
            if row[key] is not None:
                changes[key] = max(changes.get(key, 0.0), row[key])
    stages = numbers["stages"]
    if stages.get("train-sae"):
        changes["sae"] = cfg.sae.train_tokens / stages["train-sae"]
    if stages.get("extract-concepts") and numbers.get("train_tokens"):
        changes["extract"] = numbers["train_tokens"] / stages["extract-concepts"]
    if stages.get("prepare"):
        changes["loading_s"] = stages["prepare"]
    return replace(a, **changes)


def report_lines(cfg, numbers: dict[str, Any]) -> list[str]:
    """The report's student table and paired perplexity lines (the library's, from the run's files), then
    one throughput row per student."""
    summary = collect(cfg)
    rows = [("", list(summary["objectives"])), *student_table(summary)]
    first = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) + 2 for i in range(len(rows[0][1]))]
    lines = [""] + [
        f"{label:<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        for label, cells in rows
    ]
    texts = [t for t in cfg.eval.tasks if t.startswith("ppl:")]
    lines += ["", *paired_lines(summary, metrics=("val_ppl", *(f"{t} perplexity" for t in texts))), ""]
    header = ("student", "seeds", "tokens/s", "assumed", "MFU", "1st seed s", "later s")
    lines.append(f"{header[0]:<14}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, row in numbers["students"].items():
        cells = [
            str(row["seeds"]),
            f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-",
            f"{ASSUMED.speed(row['objective']):,.0f}",
            f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-",
            f"{row['first_seed_s']:.1f}" if row["first_seed_s"] is not None else "-",
            f"{row['later_seed_s']:.1f}" if row["later_seed_s"] is not None else "-",
        ]
        lines.append(f"{name:<14}" + "".join(f"{c:>12}" for c in cells))
    stages = ", ".join(f"{s} {v:.1f} s" for s, v in numbers["stages"].items() if v is not None)
    lines.append(f"upstream: {stages}")
    return lines


def git_commit() -> str | None:
    out = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return out.stdout.strip() or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--regime", choices=REGIMES, default="shakespeare", help="the corpus (default: shakespeare)"
    )
    parser.add_argument(
        "--minutes", type=float, default=8.0, help="time budget that sizes the steps (default: 8)"
    )
    parser.add_argument(
        "--timeout-minutes", type=float, default=None, help="stop here (default: minutes + 2)"
    )
    parser.add_argument("--plan", action="store_true", help="print the sizing and the command; run nothing")
    parser.add_argument(
        "--report", metavar="RUN_DIR", help="print the tables of this run folder; run nothing"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to cocomix"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = study_config(args)
        sizing = budget_sizing(args)
        sets = sizing_sets(args, sizing)
        cfg = study_config(args, sets)
    except ConfigError as exc:
        print(f"gpu_study: {exc}", file=sys.stderr)
        return 2
    if args.report:
        cfg = study_config(args, [*sets, f"run.dir={args.report}"])
        print("\n".join(report_lines(cfg, measured(cfg))))
        return 0
    planned = size(cfg, args.regime, args.minutes, steps=cfg.pretrain.max_steps)  # what --set made of it
    estimate = ", ".join(f"{k} {v:.0f} s" for k, v in planned.seconds.items())
    print(
        f"gpu_study ({args.regime}, {args.minutes:g} min): {planned.steps:,} steps x "
        f"{planned.tokens_per_step:,} tokens = {planned.tokens_per_student:,} tokens per student; on one "
        f"H200 by the assumptions: {estimate} = {sum(planned.seconds.values()):.0f} s; run folder "
        f"{cfg.run.dir}",
        flush=True,
    )
    command = cocomix_command(args, sets)
    if args.plan:
        print(shlex.join(["cocomix", *command[3:]]))
        return 0
    started = time.monotonic()
    code = run_until(command, args.timeout_minutes or args.minutes + 2)
    wall = time.monotonic() - started
    numbers = measured(cfg)
    if code == 0:
        print("\n".join(report_lines(cfg, numbers)))
    refit = budget_sizing(args, measured_assumptions(cfg, numbers))
    print(
        f"wall {wall:.0f} s for a {args.minutes:g}-minute budget; at the measured speeds and costs, "
        f"{refit.steps:,} steps would have filled it (this run: {cfg.pretrain.max_steps:,})"
    )
    result = {
        "command": shlex.join(
            ["python", "benchmarks/gpu_study.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "cocomix": shlex.join(["cocomix", *command[3:]]),
        "commit": git_commit(),
        "exit_code": code,
        "wall_s": round(wall, 1),
        "assumed": asdict(ASSUMED),
        "sizing": asdict(sizing),
        "measured": numbers,
        "steps_to_fill_the_budget": refit.steps,
    }
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run.dir) / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())

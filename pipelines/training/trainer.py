"""The training loop of `pretrain`: one student, one objective, 1..N ranks, exactly resumable.

Exactness: the batch of step s is a function of (seed, s) (`pipelines.data.batches`), the learning rate a
function of s (`pipelines.training.optim`), and a checkpoint holds model, optimizer and RNG states, so an
interrupted run that resumes ends with the same weights as one that never stopped (bitwise on CPU).
SIGTERM or SIGINT finish the current step, save a checkpoint and return (`pipelines.training.stop_signals`);
a second Ctrl-C aborts at once.
The objective (`pipelines.training.objectives`) says what the loss reads and adds; `Parallelism`
(`pipelines.training.parallel`) wraps the model and gathers its states; `SpeedMeter`
(`pipelines.training.speed`) times the steps.

Just over 400 lines, kept whole: what is left here (the loop, evaluation, checkpoint state) all
reads and writes the same step, model and ranks, and the parts that own something apart (parallelism,
speed, checkpoint files, health, stop signals) already live in their own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config.schema import Config
from pipelines.config.students import student_seed
from pipelines.core import distributed
from pipelines.core.files import truncate_jsonl_after
from pipelines.core.session import Stopped
from pipelines.data.batches import BatchOrder, BatchReader, SplitArrays
from pipelines.errors import StageError
from pipelines.training.health import NonFiniteWatch
from pipelines.training.objectives import OBJECTIVE_HEADS, Objective, ObjectiveLoss, host_tensors
from pipelines.training.parallel import Parallelism
from pipelines.training.speed import SpeedMeter
from pipelines.training.state import Checkpoints, rng_state, set_rng_state
from pipelines.training.stop_signals import StopSignals

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"

# Evaluation forwards at most this many bytes of float32 logits at once (rows x context x vocabulary x 4):
# the eager loss upcasts the logits, and at the paper's vocabulary a rank's whole batch of 1,024-token rows
# would write float32 copies of many GB where compiled training fits. Rows are independent, so splitting a
# batch changes nothing but the order of summation.
EVAL_LOGITS_BYTES = 1 << 30


@dataclass
class TrainingData:
    """What the trainer reads: train and val arrays (tokens + what the objective reads), the objective, and
    the fingerprints of the stages they came from."""

    train: SplitArrays
    val: SplitArrays
    input_artifacts: dict[str, str]
    n_concepts: int = 0
    tokenizer: dict[str, Any] = field(default_factory=dict)  # the token store's tokenizer attributes
    objective: Objective | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        *,
        model_config,
        data: TrainingData,
        ranks: distributed.Ranks,
        device: torch.device,
        stage_dir: Path,
        fingerprint: str,
        per_rank: int,
    ):
        from pipelines.model.gpt import GPT
        from pipelines.training.optim import build_optimizer

        self.cfg, self.p, self.data, self.ranks, self.device = cfg, cfg.pretrain, data, ranks, device
        self.dir, self.fingerprint, self.model_config = stage_dir, fingerprint, model_config
        torch.manual_seed(student_seed(cfg))
        self.model = GPT(model_config)
        self.objective = data.objective
        heads = self.objective.heads(self.model)
        if heads:  # after the student's initialisation, which stays what it is without them
            self.model.add_module(OBJECTIVE_HEADS, torch.nn.ModuleDict(heads))
        self.model.to(device)
        autocast = _autocast_dtype(self.p.dtype, device)
        self.parallel = Parallelism(
            ranks, device, fsdp=self.p.fsdp, compile=self.p.compile, compute_dtype=autocast
        )
        # Training runs the objective's loss wrapped (and compiled); evaluation runs it as it is.
        self.objective_loss = ObjectiveLoss(self.model, self.objective, autocast)
        self.wrapped = self.parallel.apply(self.model, self.objective_loss)
        # After wrapping: FSDP replaces the parameters with sharded ones, which the optimizer must hold.
        self.optimizer = build_optimizer(self.model, self.p, device)
        self.step = 0
        self.checkpoints = Checkpoints(stage_dir, self.p.keep_last)
        self.per_rank = per_rank
        self.global_batch = per_rank * ranks.world * self.p.grad_accum
        self.tokens_per_step = self.global_batch * model_config.context_length
        self.order = BatchOrder(data.train.n_blocks, student_seed(cfg), self.global_batch)
        self.non_finite = NonFiniteWatch(device)
        self.trackers = None  # opened by `train`, once `restore` has set the step they continue from

    # -- state --

    def save_checkpoint(self) -> None:
        self._check_finite()
        self._check_finite_parameters()
        model_state = self.parallel.model_state(self.model)
        optimizer_state = self.parallel.optimizer_state(self.model, self.optimizer)
        rng_states = self.ranks.gather(rng_state(self.device))
        if self.ranks.main:
            self.checkpoints.save(
                self.step,
                model_state,
                dataclasses.asdict(self.model_config),
                {
                    "step": self.step,
                    "optimizer": optimizer_state,
                    "rng": rng_states[0],
                    # Each rank's generators, restored rank by rank when the run resumes on as many ranks.
                    "rng_per_rank": rng_states,
                    "fingerprint": self.fingerprint,
                    "samples_seen": self.step * self.global_batch,
                },
            )
        self.ranks.barrier()

    def restore(self) -> None:
        latest, model_state, state = self.checkpoints.load_newest_intact()
        if state["fingerprint"] != self.fingerprint:
            raise StageError(f"{latest.path} belongs to a different run; pass --force to start over.")
        self.parallel.load(self.model, self.optimizer, model_state, state["optimizer"])
        per_rank = state.get("rng_per_rank") or []
        mine = per_rank[self.ranks.rank] if len(per_rank) == self.ranks.world else state["rng"]
        set_rng_state(mine, self.device)
        self.step = int(state["step"])
        if self.ranks.main:
            truncate_jsonl_after(self.dir / METRICS, self.step)
        log.info("resuming %s at step %d of %d", self.dir.name, self.step, self.p.max_steps)

    def _check_finite_parameters(self) -> None:
        """Refuse to save non-finite weights: one stacked check of this rank's (local) parameters and one
        read-back (a collective under FSDP), not one per parameter."""
        named = list(self.model.named_parameters())
        local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]
        bad = torch.stack([~torch.isfinite(p.detach()).all() for p in local]).to(torch.int32)
        if self.ranks.world > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        first = next((i for i, flag in enumerate(bad.tolist()) if flag), None)
        if first is not None:
            name = named[first][0].replace("._orig_mod", "")  # a block compiled under FSDP
            raise StageError(
                f"pretrain: parameter `{name}` is not finite at step {self.step}; no checkpoint written. "
                f"{self._last_good()}"
            )

    def _last_good(self) -> str:
        latest = self.checkpoints.latest()
        if latest is None:
            return "There is no earlier checkpoint; lower `pretrain.lr` and start over with --force."
        return (
            f"The last good checkpoint is {latest.path} (step {latest.step}); lower `pretrain.lr` or check "
            "the data, then continue with --resume."
        )

    # -- the loop --

    def train(self, show_progress: bool, on_progress=None) -> Stopped | None:
        """Train to `max_steps`; returns None when done, or where a signal stopped it early."""
        from tqdm.auto import tqdm

        p = self.p
        reader = self.batch_reader()
        bar = tqdm(
            total=p.max_steps,
            initial=self.step,
            unit="step",
            desc=self.dir.name,
            disable=not show_progress,
            dynamic_ncols=True,
        )
        with StopSignals(self.dir.name) as signals:
            try:
                self._open_trackers()
                self._announce_layout(bar if show_progress else None)
                if self.step == 0:
                    self._log({"kind": "val", "step": 0, **self.evaluate()})
                # The first window after a start holds the compilation when compiling.
                speed = SpeedMeter(self.tokens_per_step, self.device, warmup_windows=1 if p.compile else 0)
                while self.step < p.max_steps:
                    parts, grad_norm = self._train_step(reader.step(self.step))
                    self.step += 1
                    speed.step()
                    bar.update(1)
                    # The host reads values back from the device only here, at log steps.
                    if self.step % p.log_every == 0 or self.step == p.max_steps:
                        self._check_finite()
                        parts, grad_norm = self._read_back(parts, grad_norm)
                        tokens_per_s, warmup = speed.window()
                        lr = self.optimizer.param_groups[0]["lr"]  # the step's, set by `_train_step`
                        row = {"kind": "train", "step": self.step, **parts, "lr": lr, "grad_norm": grad_norm}
                        row.update(tokens_per_s=_round(tokens_per_s, 1), mfu=self.mfu(tokens_per_s))
                        row["warmup"] = warmup
                        self._log(row)
                        bar.set_postfix(loss=f"{parts['loss']:.3f}", tok_s=f"{tokens_per_s or 0:,.0f}")
                    if self.step % p.eval_every == 0 or self.step == p.max_steps:
                        with speed.paused():
                            self._check_finite()
                            self._log({"kind": "val", "step": self.step, **self.evaluate()})
                        if on_progress is not None:
                            on_progress(step=self.step, steps=p.max_steps)
                    stop = self.ranks.any(signals.requested is not None)
                    if stop or (self.step % p.save_every == 0 and self.step < p.max_steps):
                        with speed.paused():
                            self.save_checkpoint()
                    if stop:
                        latest = self.checkpoints.latest()
                        return Stopped(
                            stopped_by=signals.requested or "a signal on another rank",
                            stopped_at_step=self.step,
                            checkpoint=str(latest.path) if latest else None,
                        )
            finally:
                bar.close()
                reader.close()
                if self.trackers is not None:
                    self.trackers.close()
                    self.trackers = None
        return None

    def batch_reader(self) -> BatchReader:
        """This rank's micro-batches of each step, as host tensors read ahead (page-locked on CUDA, so
        that their copies to the GPU do not make the host wait)."""
        pin = self.device.type == "cuda"
        return BatchReader(
            self.data.train,
            self.order,
            self.per_rank,
            self.p.grad_accum,
            self.ranks.rank,
            self.ranks.world,
            convert=lambda batch: host_tensors(batch, pin=pin),
        )

    def layout(self) -> dict[str, Any]:
        """How the global batch is split: what the summary records and `_announce_layout` shows."""
        return {
            "ranks": self.ranks.world,
            "blocks_per_rank": self.per_rank,
            "grad_accum": self.p.grad_accum,
            "global_batch_blocks": self.global_batch,
            "tokens_per_step": self.tokens_per_step,
        }

    def _announce_layout(self, bar) -> None:
        """Before step 1 on several ranks: one line per node with its devices, then the batch split."""
        if self.ranks.world == 1:
            return
        lines = distributed.layout_lines(self.ranks, self.device)
        if lines is None:
            return
        split = self.layout()
        lines.append(
            f"{split['blocks_per_rank']} block(s) per rank x {split['ranks']} ranks x {split['grad_accum']} "
            f"accumulation = {split['global_batch_blocks']} blocks ({split['tokens_per_step']:,} tokens) "
            "per optimizer step"
        )
        for line in lines:
            log.info("%s", line)
            if bar is not None:
                bar.write(line, file=sys.stderr)

    def _open_trackers(self) -> None:
        if not self.ranks.main:
            return
        from pipelines.training.tracking import Trackers

        run_name = f"{Path(self.cfg.run.dir).name}/{self.dir.name}"
        self.trackers = Trackers(self.p, self.dir, self.step, run_name, dataclasses.asdict(self.cfg))

    def _train_step(self, micro_batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Optimizer step `self.step` at its learning rate; returns the loss parts and the gradient norm as
        device tensors, unread."""
        from pipelines.training.optim import learning_rate

        p = self.p
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, p)
        totals: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self.parallel.gradient_sync(self.wrapped, last):
                loss, parts = self._loss(batch, self.wrapped)
                (loss / len(micro_batches)).backward()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value.detach() / len(micro_batches)
        clip = p.grad_clip if p.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP, replicated on every rank
            grad_norm = grad_norm.full_tensor()
        self.non_finite.observe(self.step + 1, totals["loss"], grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals, grad_norm

    def _read_back(
        self, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor
    ) -> tuple[dict[str, float], float]:
        """A step's loss parts (the global batch's, as one process would see them) and gradient norm."""
        names = sorted(parts)
        values = torch.stack([parts[name].float() for name in names])
        if self.ranks.world > 1:
            torch.distributed.all_reduce(values)
            values /= self.ranks.world
        *values, norm = torch.cat([values, grad_norm.detach().float().reshape(1)]).tolist()
        return {name: round(v, 6) for name, v in zip(names, values, strict=True)}, round(norm, 6)

    def _check_finite(self) -> None:
        problem = self.non_finite.first_problem(self.ranks)
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)
            step, what = problem
            raise StageError(f"pretrain: {what} at step {step}. {self._last_good()}")

    def _loss(self, batch: dict[str, torch.Tensor], module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}
        tokens = batch["tokens"]
        return module(tokens, self.objective.inputs(tokens, batch))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the val blocks: NTP loss and perplexity, and the objective's `val_parts` (CoCoMix's
        concept loss against cached targets).

        Every rank makes the same number of forwards, a rank out of rows forwarding one with weight 0:
        under FSDP each forward gathers parameters with the other ranks, which would otherwise wait for a
        partner that has moved on. Compiled code runs eagerly here (no graphs for other shapes or for
        no_grad), in forwards of at most `EVAL_LOGITS_BYTES` of logits."""
        p, val = self.p, self.data.val
        blocks = val.n_blocks if not p.eval_blocks else min(p.eval_blocks, val.n_blocks)
        rows_per_forward = self.eval_rows_per_forward()
        per_round = rows_per_forward * self.ranks.world
        names = ("ntp_loss", *self.objective.val_parts)
        # A sum per part, then the blocks, kept on the device: read back once, at the end.
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        # Only when compiling: `set_stance` imports Dynamo, seconds at every start of a process that is not.
        eager = torch.compiler.set_stance("force_eager") if self.p.compile else contextlib.nullcontext()
        with eager:
            for first in range(0, blocks, per_round):
                start = first + self.ranks.rank * rows_per_forward
                rows = np.arange(start, min(start + rows_per_forward, blocks))
                weight = len(rows)
                if not weight:
                    rows = np.arange(1)  # any row: only the forward's collectives count
                _, parts = self._loss(host_tensors(val.read(rows)), self.objective_loss)
                if weight:
                    sums[:-1] += torch.stack([parts[name].double() for name in names]) * weight
                    sums[-1] += weight
        self.model.train(was_training)
        if self.ranks.world > 1:
            torch.distributed.all_reduce(sums)
        val_loss = (sums[0] / sums[-1]).item()
        result = {"val_loss": round(val_loss, 6), "val_ppl": round(math.exp(min(val_loss, 50.0)), 4)}
        for index, name in enumerate(names[1:], start=1):
            result[f"val_{name}"] = round((sums[index] / sums[-1]).item(), 6)
        return result

    def eval_rows_per_forward(self) -> int:
        """The rows of one evaluation forward: this rank's batch, or fewer where their float32 logits would
        pass `EVAL_LOGITS_BYTES`."""
        row_bytes = self.model_config.context_length * self.model_config.vocab_size * 4
        return max(1, min(self.per_rank, EVAL_LOGITS_BYTES // row_bytes))

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """The MFU of training at `tokens_per_s` on these ranks, to 5 digits; None off a GPU of known peak."""
        from pipelines.model.flops import mfu

        if tokens_per_s is None:
            return None
        seq_len, count_extra = self.model_config.context_length, self.objective.spec.extra_flops
        extra = count_extra(self.model_config, seq_len) if count_extra else 0.0  # the objective's heads
        found = mfu(self.model_config, seq_len, tokens_per_s, self.device, self.ranks.world, extra)
        return _round(found, 5)

    # -- outputs --

    def _log(self, row: dict[str, Any]) -> None:
        if not self.ranks.main:
            return
        with open(self.dir / METRICS, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.trackers.log(row)
        if row["kind"] == "val":
            log.info(
                "%s step %d: val loss %.4f (ppl %.2f)",
                self.dir.name,
                row["step"],
                row["val_loss"],
                row["val_ppl"],
            )

    def final_state(self) -> dict[str, torch.Tensor] | None:
        """The trained weights on the host, gathered from every rank: a collective that every rank calls;
        the first rank gets them, the others None."""
        model_state = self.parallel.model_state(self.model)
        if not self.ranks.main:
            return None
        return {k: v.cpu() for k, v in model_state.items() if not k.startswith(f"{OBJECTIVE_HEADS}.")}


def _autocast_dtype(setting: str, device) -> torch.dtype | None:
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)

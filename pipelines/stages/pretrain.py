"""`pretrain`: train the student on the cached stores with one objective, exactly resumable, on 1..N ranks.

Objectives (`[pretrain] objective`, one class each in `pipelines.training.objectives`): `ntp`; `cocomix` =
NTP + lam_concept x concept loss on the cached targets of `extract-concepts` (or targets computed in the
loop with `--online-teacher`, the official way); `kd` = NTP + kd_coef x KL to the cached teacher top-N;
`pause` = NTP with the pause model. Each writes `<run.dir>/pretrain-<objective>[-online]/`: `model/` (the
final student), `checkpoints/`, `metrics.jsonl`, `loss_curve.png` and the manifest with the summary.

Exactness: the batch of step s is a function of (seed, s) (`pipelines.data.batches`), the learning rate a
function of s (`pipelines.training.optim`), and a checkpoint holds model, optimizer and RNG states, so an
interrupted run that resumes ends with the same weights as one that never stopped (bitwise on CPU).
SIGTERM or SIGINT finish the current step, save a checkpoint and return (exit 0); a second signal aborts
at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config.schema import Config
from pipelines.core import distributed, stage_inputs
from pipelines.core.assets import resolve_assets
from pipelines.core.devices import resolve_device
from pipelines.core.files import truncate_jsonl_after
from pipelines.core.fingerprints import fingerprint_fields, fingerprint_path
from pipelines.core.layout import CONCEPTS_STORE, EXTRACT_STAGE, FINAL_MODEL, TRAIN_SAE_STAGE, pretrain_stage
from pipelines.core.session import StageResult, StageSession, finished_upstream, refuse_changed_upstream
from pipelines.data.batches import BatchOrder, BatchReader, SplitArrays
from pipelines.data.stores import TokenStore, open_prepared_tokens
from pipelines.errors import CocomixError, ConfigError, InputError, StageError
from pipelines.training.state import Checkpoints, rng_state, set_rng_state

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
VARIANTS = {"ntp": "ntp", "cocomix": "cocomix", "kd": "ntp", "pause": "pause"}
# Dense bf16 peak FLOP/s per GPU for MFU; other devices report no MFU rather than a guess.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


stage_name = pretrain_stage


@dataclass
class TrainingData:
    """What the objective reads: train and val arrays (tokens + targets) and the stores they came from."""

    train: SplitArrays
    val: SplitArrays
    input_artifacts: dict[str, str]
    n_concepts: int = 0
    tokenizer: dict[str, Any] = field(default_factory=dict)  # the token store's tokenizer attributes
    online: Any = None  # (teacher, sae) when targets are computed in the loop
    inputs: dict[str, Any] = field(default_factory=dict)


def run(
    cfg: Config,
    *,
    online_teacher: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> StageResult:
    cfg = resolve_assets(cfg)
    p = cfg.pretrain
    device = resolve_device(p.device)
    ranks = distributed.start(device)
    device = distributed.rank_device(device, ranks)
    if online_teacher and p.objective != "cocomix":
        raise ConfigError(f"--online-teacher computes CoCoMix targets; objective `{p.objective}` has none.")
    with contextlib.ExitStack() as reading:
        return _pretrain(cfg, reading, ranks, device, online_teacher, resume, force, progress)


def _pretrain(
    cfg: Config,
    reading: contextlib.ExitStack,
    ranks,
    device,
    online_teacher: bool,
    resume: bool,
    force: bool,
    progress: bool,
) -> StageResult:
    p = cfg.pretrain
    run_dir = Path(cfg.run.dir)
    token_store, prepare_fingerprint = open_prepared_tokens(reading, run_dir, stage_inputs.prepare(cfg))
    data = _training_data(cfg, reading, token_store, prepare_fingerprint, online_teacher, device)
    model_config = _model_config(cfg, token_store, data.n_concepts)
    per_rank = _per_rank_batch(p, ranks.world)
    stage = stage_name(p.objective, online_teacher)
    inputs = {
        **{k: v for k, v in fingerprint_fields(p, "pretrain").items() if "batch_blocks" not in k},
        **{f"model.{k}": v for k, v in dataclasses.asdict(model_config).items()},
        "run.seed": cfg.run.seed,
        # The result depends on the global batch, not on how it is split: a run may resume on more ranks.
        "global_batch_blocks": per_rank * ranks.world * p.grad_accum,
        **data.inputs,
    }
    with contextlib.ExitStack() as stack:
        session, decision = _open_session(
            stack, ranks, run_dir, stage, inputs, data.input_artifacts, force, resume, p.keep_last
        )
        if decision["up_to_date"]:
            return StageResult(
                stage, run_dir / stage, True, decision["summary"], decision["fingerprint"]
            )
        trainer = Trainer(
            cfg, model_config, data, ranks, device, run_dir / stage, decision["fingerprint"], per_rank
        )
        if decision["resuming"]:
            trainer.restore()
        elif ranks.main:
            (run_dir / stage / METRICS).unlink(missing_ok=True)
        on_progress = session.update_progress if session is not None else None
        stopped = trainer.train(show_progress=progress and ranks.main, on_progress=on_progress)
        if stopped is not None:
            return StageResult(stage, run_dir / stage, False, stopped, decision["fingerprint"])
        summary = trainer.finish()
        if session is not None:
            session.complete(summary, outputs=[FINAL_MODEL])
        ranks.barrier()
        return StageResult(stage, run_dir / stage, False, summary, decision["fingerprint"])


def _open_session(stack, ranks, run_dir, stage, inputs, input_artifacts, force, resume, keep_last):
    """Rank 0 decides (up to date / resume / fresh / refuse) and tells the others; errors reach every rank."""
    session, decision, error = None, {}, None
    if ranks.main:
        try:
            session = stack.enter_context(
                StageSession(run_dir, stage, inputs, input_artifacts=input_artifacts, force=force)
            )
            latest = Checkpoints(session.dir, keep_last).latest()
            if session.resuming and latest is not None and not resume:
                raise StageError(
                    f"{session.dir} has checkpoints up to step {latest.step} of this run. Pass --resume to "
                    "continue from them, or --force to start over."
                )
            if resume and latest is None and not session.up_to_date:
                log.info("nothing to resume in %s; starting from step 0", session.dir)
            decision = {
                "up_to_date": session.up_to_date,
                "resuming": session.resuming and latest is not None,
                "summary": session.summary,
                "fingerprint": session.fingerprint,
            }
        except CocomixError as exc:
            error = exc
    shared = ranks.broadcast({"decision": decision, "error": None if error is None else str(error)})
    if error is not None:
        raise error
    if shared["error"] is not None:
        raise StageError(shared["error"])
    return session, shared["decision"]


# --- inputs ---------------------------------------------------------------------------------------------


def _training_data(
    cfg: Config,
    reading: contextlib.ExitStack,
    token_store: TokenStore,
    prepare_fingerprint: str,
    online: bool,
    device,
):
    p = cfg.pretrain
    splits = {split: {"tokens": token_store.split(split)} for split in ("train", "val")}
    input_artifacts = {"prepare": prepare_fingerprint}
    n_concepts, online_models, inputs = 0, None, {}
    if p.objective == "cocomix" and online:
        online_models, n_concepts, inputs, more = _online_teacher(
            cfg, reading, token_store, prepare_fingerprint, device
        )
        input_artifacts.update(more)
    elif p.objective in ("cocomix", "kd"):
        store, store_fingerprint = _concept_store(cfg, reading, prepare_fingerprint, token_store)
        input_artifacts["extract-concepts"] = store_fingerprint
        if p.objective == "cocomix":
            n_concepts = int(store.attrs["sae"]["d_sae"])
            names = ("concept_ids", "valid")
        else:
            _check_kd(store, token_store)
            names = ("teacher_ids", "teacher_logprobs", "valid")
        for split in splits:
            splits[split].update({name: store[split][name] for name in names})
    if p.objective == "cocomix" and p.n_concepts and p.n_concepts != n_concepts:
        raise InputError(
            f"`pretrain.n_concepts` ({p.n_concepts}) does not match the concept targets, which come from an "
            f"SAE with {n_concepts} latents. Set it to 0 (take the SAE's width) or to {n_concepts}."
        )
    if not splits["val"]["tokens"].shape[0]:
        raise InputError(
            "The token store has no validation blocks; raise `data.val_fraction` and re-prepare."
        )
    return TrainingData(
        train=SplitArrays(splits["train"]),
        val=SplitArrays(splits["val"]),
        input_artifacts=input_artifacts,
        n_concepts=n_concepts,
        tokenizer=token_store.attrs["tokenizer"],
        online=online_models,
        inputs=inputs,
    )


def _concept_store(
    cfg: Config, reading: contextlib.ExitStack, prepare_fingerprint: str, token_store: TokenStore
):
    import zarr

    hint = (
        "run `cocomix extract-concepts` first, or pass --online-teacher to compute targets in the loop"
        if cfg.pretrain.objective == "cocomix"
        else "run `cocomix extract-concepts --store-teacher-topk N` first"
    )
    run_dir = Path(cfg.run.dir)
    if not cfg.sae.path:  # the targets come from this run's SAE: its settings must still be the config's
        refuse_changed_upstream(run_dir, TRAIN_SAE_STAGE, stage_inputs.train_sae(cfg))
    finished = reading.enter_context(
        finished_upstream(
            run_dir,
            EXTRACT_STAGE,
            CONCEPTS_STORE,
            expected=stage_inputs.extract_concepts(cfg),
            missing=f"Objective `{cfg.pretrain.objective}` reads cached teacher outputs, but {cfg.run.dir} "
            f"has no finished concept store: {hint}.",
        )
    )
    path, fingerprint = finished.path, finished.fingerprint
    store = zarr.open_group(str(path), mode="r")
    if store.attrs.get("token_store_fingerprint") != prepare_fingerprint:
        raise InputError(
            f"{path} was extracted from a different token store than {token_store.path}. "
            "Run `cocomix extract-concepts --force` to recompute it."
        )
    for split in ("train", "val"):
        if store[split]["valid"].shape[:2] != token_store.split(split).shape:
            raise InputError(
                f"{path} `{split}` has shape {store[split]['valid'].shape[:2]} but the token store's is "
                f"{token_store.split(split).shape}. Run `cocomix extract-concepts --force`."
            )
    return store, fingerprint


def _check_kd(store, token_store: TokenStore) -> None:
    if "teacher_ids" not in store.attrs.get("arrays", []):
        raise StageError(
            "Objective `kd` needs the teacher's top-N log-probs, which this concept store lacks. Run "
            "`cocomix extract-concepts --store-teacher-topk 32 --force`."
        )
    teacher_vocab = store.attrs.get("teacher", {}).get("vocab_size")
    student_vocab = int(token_store.attrs["tokenizer"]["vocab_size"])
    if teacher_vocab is not None and teacher_vocab != student_vocab:
        raise InputError(
            f"KD needs the teacher and the student to share a vocabulary: the teacher has {teacher_vocab} "
            f"tokens, the student (the token store's tokenizer) {student_vocab}."
        )


def _online_teacher(
    cfg: Config, reading: contextlib.ExitStack, token_store: TokenStore, prepare_fingerprint: str, device
):
    from pipelines.concepts.targets import load_teacher_and_sae, resolve_sae_path

    cfg, more = resolve_sae_path(cfg, reading)
    teacher, sae = load_teacher_and_sae(cfg, token_store, prepare_fingerprint, device)
    inputs = {
        **fingerprint_fields(cfg.teacher, "teacher"),
        "sae.path": fingerprint_path(cfg.sae.path),
        "extract.concepts_per_token": cfg.extract.concepts_per_token,
        "extract.attribution": cfg.extract.attribution,
    }
    return (teacher, sae), int(sae.d_sae), inputs, more


def _per_rank_batch(p, world: int) -> int:
    if not p.global_batch_blocks:
        return p.batch_blocks
    per_rank, remainder = divmod(p.global_batch_blocks, world * p.grad_accum)
    if remainder or not per_rank:
        raise ConfigError(
            f"`pretrain.global_batch_blocks` ({p.global_batch_blocks}) does not divide across {world} "
            f"rank(s) x `pretrain.grad_accum` ({p.grad_accum}). Choose a multiple of {world * p.grad_accum}."
        )
    return per_rank


def _model_config(cfg: Config, token_store: TokenStore, n_concepts: int):
    from pipelines.model.gpt import preset

    p = cfg.pretrain
    overrides: dict[str, Any] = {
        "vocab_size": int(token_store.attrs["tokenizer"]["vocab_size"]),
        "context_length": token_store.block_size,
        "mixing": p.mixing if p.objective == "cocomix" else "interleave",
    }
    if p.objective == "cocomix":
        overrides.update(n_concepts=n_concepts, concept_k=min(p.concept_k, n_concepts))
    for name in ("n_layer", "n_head", "n_embd", "insert_layer"):
        if getattr(p, name):
            overrides[name] = getattr(p, name)
    try:
        return preset(p.preset, VARIANTS[p.objective], **overrides)
    except ValueError as exc:
        raise ConfigError(f"[pretrain] gives an invalid model: {exc}.") from None


# --- training -------------------------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        cfg: Config,
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
        torch.manual_seed(cfg.run.seed)
        self.model = GPT(model_config).to(device)
        self.wrapped = self._wrap(self.model)
        # After wrapping: FSDP replaces the parameters with sharded ones, which the optimizer must hold.
        self.optimizer = build_optimizer(self.model, self.p, device)
        self.step = 0
        self.checkpoints = Checkpoints(stage_dir, self.p.keep_last)
        self.per_rank = per_rank
        self.global_batch = per_rank * ranks.world * self.p.grad_accum
        self.tokens_per_step = self.global_batch * model_config.context_length
        self.order = BatchOrder(data.train.n_blocks, cfg.run.seed, self.global_batch)
        self.autocast = _autocast_dtype(self.p.dtype, device)
        self._stop_signal: str | None = None
        self.trackers = None
        if ranks.main:
            from pipelines.training.tracking import Trackers

            self.trackers = Trackers(
                stage_dir / "tensorboard" if self.p.tensorboard else None,
                self.p.wandb_project,
                f"{Path(cfg.run.dir).name}/{stage_dir.name}",
                dataclasses.asdict(cfg),
            )

    def _wrap(self, model):
        wrapped = model
        if self.ranks.world > 1:
            if self.p.fsdp:
                from torch.distributed.fsdp import fully_shard

                for block in model.h:
                    fully_shard(block)
                wrapped = fully_shard(model)
            else:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                wrapped = DistributedDataParallel(model, device_ids=ids)
        if self.p.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    # -- state --

    def _model_state(self) -> dict[str, torch.Tensor]:
        if self.p.fsdp and self.ranks.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.model.state_dict()

    def _optimizer_state(self) -> dict[str, Any]:
        if self.p.fsdp and self.ranks.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> None:
        for name, param in self.model.named_parameters():
            if not bool(torch.isfinite(param.detach()).all()):
                raise StageError(
                    f"pretrain: parameter `{name}` is not finite at step {self.step}; no checkpoint written. "
                    f"{self._last_good()}"
                )
        model_state, optimizer_state = self._model_state(), self._optimizer_state()
        if self.ranks.main:
            self.checkpoints.save(
                self.step,
                model_state,
                dataclasses.asdict(self.model_config),
                {
                    "step": self.step,
                    "optimizer": optimizer_state,
                    "rng": rng_state(),
                    "fingerprint": self.fingerprint,
                    "samples_seen": self.step * self.global_batch,
                },
            )
        self.ranks.barrier()

    def restore(self) -> None:
        latest, model_state, state = self.checkpoints.load_newest_intact()
        if state["fingerprint"] != self.fingerprint:
            raise StageError(f"{latest.path} belongs to a different run; pass --force to start over.")
        if self.p.fsdp and self.ranks.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, model_state, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.ranks.main:
            truncate_jsonl_after(self.dir / METRICS, self.step)
        log.info("resuming %s at step %d of %d", self.dir.name, self.step, self.p.max_steps)

    def _last_good(self) -> str:
        latest = self.checkpoints.latest()
        if latest is None:
            return "There is no earlier checkpoint; lower `pretrain.lr` and start over with --force."
        return (
            f"The last good checkpoint is {latest.path} (step {latest.step}); lower `pretrain.lr` or check "
            "the data, then continue with --resume."
        )

    # -- the loop --

    def train(self, show_progress: bool, on_progress=None) -> dict[str, Any] | None:
        """Train to `max_steps`; returns None when done, or a summary when a signal stopped it early."""
        from tqdm.auto import tqdm

        from pipelines.training.optim import learning_rate

        p = self.p
        reader = BatchReader(
            self.data.train, self.order, self.per_rank, p.grad_accum, self.ranks.rank, self.ranks.world
        )
        bar = tqdm(
            total=p.max_steps,
            initial=self.step,
            unit="step",
            desc=self.dir.name,
            disable=not show_progress,
            dynamic_ncols=True,
        )
        previous_handlers = self._install_signal_handlers()
        if self.step == 0:
            self._log({"kind": "val", "step": 0, **self.evaluate()})
        window_started, window_steps = time.monotonic(), 0
        try:
            while self.step < p.max_steps:
                lr = learning_rate(self.step, p)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                parts, grad_norm = self._train_step(reader.step(self.step))
                self.step += 1
                window_steps += 1
                bar.update(1)
                if self.step % p.log_every == 0 or self.step == p.max_steps:
                    elapsed = time.monotonic() - window_started
                    tokens_per_s = window_steps * self.tokens_per_step / elapsed if elapsed > 0 else None
                    row = {"kind": "train", "step": self.step, **parts, "lr": lr, "grad_norm": grad_norm}
                    row.update(tokens_per_s=_round(tokens_per_s, 1), mfu=_round(self._mfu(tokens_per_s), 5))
                    self._log(row)
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", tok_s=f"{tokens_per_s or 0:,.0f}")
                    window_started, window_steps = time.monotonic(), 0
                if self.step % p.eval_every == 0 or self.step == p.max_steps:
                    self._log({"kind": "val", "step": self.step, **self.evaluate()})
                    if on_progress is not None:
                        on_progress(step=self.step, steps=p.max_steps)
                stop = self.ranks.any(self._stop_signal is not None, self.device)
                if stop or (self.step % p.save_every == 0 and self.step < p.max_steps):
                    self.save_checkpoint()
                if stop:
                    latest = self.checkpoints.latest()
                    return {
                        "stopped_by": self._stop_signal or "a signal on another rank",
                        "stopped_at_step": self.step,
                        "checkpoint": str(latest.path) if latest else None,
                    }
        finally:
            bar.close()
            reader.close()
            if self.trackers is not None:
                self.trackers.close()
            self._restore_signal_handlers(previous_handlers)
        return None

    def _train_step(self, micro_batches) -> tuple[dict[str, float], float]:
        p = self.p
        totals: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(self.wrapped, "no_sync")
                else self.wrapped.no_sync()
            )
            with sync:
                loss, parts = self._loss(batch, train=True)
                (loss / len(micro_batches)).backward()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value.detach() / len(micro_batches)
        names = sorted(totals)
        values = torch.stack([totals[name].float() for name in names])
        if self.ranks.world > 1:  # the logged losses are the global batch's, as one process would see them
            torch.distributed.all_reduce(values)
            values /= self.ranks.world
        parts = dict(zip(names, values.tolist(), strict=True))
        if not math.isfinite(parts["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise StageError(
                f"pretrain: the loss is {parts['loss']} at step {self.step + 1}. {self._last_good()}"
            )
        clip = p.grad_clip if p.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise StageError(
                f"pretrain: the gradient norm is {grad_norm} at step {self.step + 1}. {self._last_good()}"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {name: round(value, 6) for name, value in parts.items()}, round(grad_norm, 6)

    def _loss(
        self, batch: dict[str, np.ndarray], train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from pipelines.training.objectives import (
            concept_loss,
            kd_loss,
            next_token_loss,
            online_concept_targets,
        )

        p = self.p
        tokens = torch.from_numpy(batch["tokens"].astype(np.int64)).to(self.device)
        targets = valid = None
        if p.objective == "cocomix":
            if self.data.online is not None:
                teacher, sae = self.data.online
                targets, valid = online_concept_targets(
                    teacher, sae, tokens, self.cfg.extract.concepts_per_token, self.cfg.extract.attribution
                )
            else:
                targets = torch.from_numpy(batch["concept_ids"].astype(np.int64)).to(self.device)
                valid = torch.from_numpy(batch["valid"]).to(self.device)
        model = self.wrapped if train else self.model
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = model(tokens)
        ntp = next_token_loss(out.logits, tokens)
        parts = {"ntp_loss": ntp}
        loss = ntp
        if targets is not None:
            parts["concept_loss"] = concept_loss(out.concept_logits, targets, valid)
            loss = loss + p.lam_concept * parts["concept_loss"]
        if p.objective == "kd":
            parts["kd_loss"] = kd_loss(
                out.logits,
                torch.from_numpy(batch["teacher_ids"].astype(np.int64)).to(self.device),
                torch.from_numpy(batch["teacher_logprobs"].astype(np.float32)).to(self.device),
                torch.from_numpy(batch["valid"]).to(self.device),
            )
            loss = loss + p.kd_coef * parts["kd_loss"]
        parts["loss"] = loss
        return loss, parts

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss on the val blocks (NTP loss and perplexity; the concept loss too when targets are cached)."""
        p, val = self.p, self.data.val
        blocks = val.n_blocks if not p.eval_blocks else min(p.eval_blocks, val.n_blocks)
        mine = range(self.ranks.rank * self.per_rank, blocks, self.per_rank * self.ranks.world)
        sums = torch.zeros(3, dtype=torch.float64)  # ntp sum, concept sum, blocks
        was_training = self.model.training
        self.model.eval()
        for start in mine:
            rows = np.arange(start, min(start + self.per_rank, blocks))
            batch = val.read(rows)
            if self.data.online is not None:
                batch = {"tokens": batch["tokens"]}
            _, parts = self._loss(batch, train=False)
            sums[0] += parts["ntp_loss"].item() * len(rows)
            sums[1] += parts["concept_loss"].item() * len(rows) if "concept_loss" in parts else 0.0
            sums[2] += len(rows)
        self.model.train(was_training)
        if self.ranks.world > 1:
            torch.distributed.all_reduce(sums)
        val_loss = (sums[0] / sums[2]).item()
        result = {"val_loss": round(val_loss, 6), "val_ppl": round(math.exp(min(val_loss, 50.0)), 4)}
        if p.objective == "cocomix" and self.data.online is None:
            result["val_concept_loss"] = round((sums[1] / sums[2]).item(), 6)
        return result

    def _mfu(self, tokens_per_s: float | None) -> float | None:
        from pipelines.model.flops import train_flops_per_token

        if tokens_per_s is None or self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
        if peak is None:
            return None
        flops = train_flops_per_token(self.model_config, self.model_config.context_length)
        return flops * tokens_per_s / (peak * self.ranks.world)

    # -- signals --

    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            log.warning(
                "%s received: finishing step %d, then saving a checkpoint", self._stop_signal, self.step + 1
            )

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

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

    def finish(self) -> dict[str, Any]:
        from pipelines.core.plot import line_chart
        from pipelines.data.tokenizer import load_tokenizer
        from pipelines.model.checkpoint import save_model
        from pipelines.model.flops import parameter_counts

        model_state = self._model_state()
        if not self.ranks.main:
            return {}
        from pipelines.model.gpt import GPT

        final = GPT(self.model_config)
        final.load_state_dict({k: v.cpu() for k, v in model_state.items()})
        # Evaluation and generation need the tokenizer the blocks were made with, beside the weights.
        tokenizer = self.data.tokenizer
        save_model(
            final,
            self.dir / FINAL_MODEL,
            {"tokenizer": {k: tokenizer[k] for k in ("spec", "vocab_hash", "separator", "separator_id")}},
        )
        load_tokenizer(tokenizer["spec"]).backend.save(str(self.dir / FINAL_MODEL / "tokenizer.json"))
        rows = [json.loads(line) for line in (self.dir / METRICS).read_text().splitlines()]
        train_rows = [r for r in rows if r["kind"] == "train"]
        val_rows = [r for r in rows if r["kind"] == "val"]
        line_chart(
            self.dir / LOSS_CURVE,
            [
                [(r["step"], r["ntp_loss"]) for r in train_rows],
                [(r["step"], r["val_loss"]) for r in val_rows],
            ],
        )
        speeds = [r["tokens_per_s"] for r in train_rows if r.get("tokens_per_s")]
        counts = parameter_counts(self.model_config)
        return {
            "model": str(self.dir / FINAL_MODEL),
            "objective": self.p.objective,
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "parameters": counts["total"],
            "active_parameters": counts["active"],
            "train_loss": train_rows[-1]["loss"],
            "ntp_loss": train_rows[-1]["ntp_loss"],
            **{k: v for k, v in val_rows[-1].items() if k not in ("kind", "step")},
            "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
            "loss_curve": str(self.dir / LOSS_CURVE),
            "loss_curve_colours": "blue: train NTP loss, orange: val loss",
            "ranks": self.ranks.world,
        }


def _autocast_dtype(setting: str, device) -> torch.dtype | None:
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)

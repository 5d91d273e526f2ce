"""`pretrain`: train the student on the cached stores with one objective, exactly resumable, on 1..N ranks.

Objectives (`[pretrain] objective`, one class each in `pipelines.training.objectives`): `ntp`; `cocomix` =
NTP + lam_concept x concept loss on the cached targets of `extract-concepts` (or targets computed in the
loop with `--online-teacher`, the official way); `kd` = NTP + kd_coef x KL to the cached teacher top-N;
`pause` = NTP with the pause model. Each writes `<run.dir>/pretrain-<objective>[-online]/`: `model/` (the
final student), `hf/` (the same student as a transformers folder, what `cocomix export` writes),
`checkpoints/`, `metrics.jsonl`, `loss_curve.png` and the manifest with the summary.

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
from pathlib import Path
from typing import Any

from pipelines.config.schema import Config
from pipelines.config.students import for_its_objective, student_seed
from pipelines.core import distributed, stage_inputs
from pipelines.core.assets import resolve_assets
from pipelines.core.devices import resolve_device
from pipelines.core.fingerprints import fingerprint_fields, fingerprint_path
from pipelines.core.layout import EXTRACT_STAGE, FINAL_MODEL, HF_MODEL, TRAIN_SAE_STAGE, student_stage
from pipelines.core.session import StageResult, StageSession, refuse_changed_upstream
from pipelines.data.batches import SplitArrays
from pipelines.data.concept_store import ConceptStore, open_extracted_concepts
from pipelines.data.token_store import TokenStore, open_prepared_tokens
from pipelines.errors import CocomixError, ConfigError, InputError, OtherRankError, StageError
from pipelines.objectives.declaration import objective_spec
from pipelines.training.objectives import Objective, objective_for
from pipelines.training.speed import steady_speed
from pipelines.training.state import Checkpoints
from pipelines.training.trainer import METRICS, Trainer, TrainingData

log = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.png"


def run(
    cfg: Config,
    *,
    online_teacher: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> StageResult:
    cfg = for_its_objective(resolve_assets(cfg))
    p = cfg.pretrain
    device = resolve_device(p.device, "pretrain.device")
    ranks = distributed.start(device, "pretrain.device")
    device = distributed.rank_device(device, ranks)
    if online_teacher and p.objective != "cocomix":
        raise ConfigError(f"--online-teacher computes CoCoMix targets; objective `{p.objective}` has none.")
    if online_teacher and p.concept_targets != "attribution":
        raise ConfigError(
            "--online-teacher computes targets by attribution; `pretrain.concept_targets = "
            f'"{p.concept_targets}"` reads the SAE top-k of the concept store: drop one of the two.'
        )
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
    model_config = _model_config(cfg, token_store, data.objective, data.n_concepts)
    per_rank = _per_rank_batch(p, ranks.world)
    stage = student_stage(cfg, online_teacher)
    inputs = {
        **stage_inputs.pretrain(cfg),
        **{f"model.{k}": v for k, v in dataclasses.asdict(model_config).items()},
        # The student's own seed (`pretrain.seed`, else `run.seed`), under the key older runs recorded.
        "run.seed": student_seed(cfg),
        # The result depends on the global batch, not on how it is split: a run may resume on more ranks.
        "global_batch_blocks": per_rank * ranks.world * p.grad_accum,
        **data.inputs,
    }
    with contextlib.ExitStack() as stack:
        session, decision = _open_session(
            stack,
            ranks,
            run_dir,
            stage,
            inputs,
            input_artifacts=data.input_artifacts,
            force=force,
            resume=resume,
            keep_last=p.keep_last,
        )
        if decision.up_to_date:
            return StageResult(stage, run_dir / stage, True, decision.summary, decision.fingerprint)
        trainer = Trainer(
            cfg,
            model_config=model_config,
            data=data,
            ranks=ranks,
            device=device,
            stage_dir=run_dir / stage,
            fingerprint=decision.fingerprint,
            per_rank=per_rank,
        )
        if decision.resuming:
            trainer.restore()
        elif ranks.main:
            (run_dir / stage / METRICS).unlink(missing_ok=True)
        on_progress = session.update_progress if session is not None else None
        stopped = trainer.train(show_progress=progress and ranks.main, on_progress=on_progress)
        if stopped is not None:
            summary = dataclasses.asdict(stopped)
            return StageResult(stage, run_dir / stage, False, summary, decision.fingerprint, stopped=stopped)
        final_state = trainer.final_state()
        if session is not None:
            summary = _write_student(run_dir / stage, cfg, model_config, final_state, data, trainer)
            session.complete(summary, outputs=[FINAL_MODEL, HF_MODEL])
        else:
            summary = {}
        ranks.barrier()
        return StageResult(stage, run_dir / stage, False, summary, decision.fingerprint)


def _write_student(stage_dir: Path, cfg: Config, model_config, state, data, trainer) -> dict[str, Any]:
    """The trained student's files (`model/` with its tokenizer, `hf/`, `loss_curve.png`) and its summary."""
    from pipelines.core.plot import LOSS_AXES, loss_curves, write_loss_chart
    from pipelines.data.tokenizer import load_tokenizer
    from pipelines.model.checkpoint import save_model
    from pipelines.model.flops import parameter_counts
    from pipelines.model.gpt import GPT
    from pipelines.model.hf_export import export_student

    final = GPT(model_config)
    final.load_state_dict(state)
    # Evaluation and generation need the tokenizer the blocks were made with, beside the weights.
    tokenizer = data.tokenizer
    save_model(
        final,
        stage_dir / FINAL_MODEL,
        {"tokenizer": {k: tokenizer[k] for k in ("spec", "vocab_hash", "separator", "separator_id")}},
    )
    load_tokenizer(tokenizer["spec"]).backend.save(str(stage_dir / FINAL_MODEL / "tokenizer.json"))
    export_student(stage_dir / FINAL_MODEL, stage_dir / HF_MODEL)
    rows = [json.loads(line) for line in (stage_dir / METRICS).read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    write_loss_chart(
        stage_dir / LOSS_CURVE,
        {stage_dir.name: loss_curves(rows)},
        **LOSS_AXES,
        title=f"{stage_dir.name}: next-token loss",
    )
    tokens_per_s = steady_speed(train_rows)
    counts = parameter_counts(model_config)
    return {
        "model": str(stage_dir / FINAL_MODEL),
        "hf_model": str(stage_dir / HF_MODEL),
        "objective": cfg.pretrain.objective,
        "steps": trainer.step,
        "tokens": trainer.step * trainer.tokens_per_step,
        "parameters": counts["total"],
        "active_parameters": counts["active"],
        "train_loss": train_rows[-1]["loss"],
        "ntp_loss": train_rows[-1]["ntp_loss"],
        **{k: v for k, v in val_rows[-1].items() if k not in ("kind", "step")},
        # The median of the logged windows, evaluation, checkpoints and compilation left out; MFU where
        # the GPU's peak is known.
        "tokens_per_s": tokens_per_s,
        "mfu": trainer.mfu(tokens_per_s),
        "loss_curve": str(stage_dir / LOSS_CURVE),
        **trainer.layout(),
    }


@dataclasses.dataclass(frozen=True)
class Decision:
    """What rank 0 decided for every rank: nothing to do, resume from a checkpoint, or start fresh."""

    up_to_date: bool = False
    resuming: bool = False
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    fingerprint: str = ""


def _open_session(
    stack, ranks, run_dir, stage, inputs, *, input_artifacts, force, resume, keep_last
) -> tuple[StageSession | None, Decision]:
    """Rank 0 decides (up to date / resume / fresh / refuse) and tells the others; errors reach every rank."""
    session, decision, error = None, Decision(), None
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
                log.warning("--resume: %s has no checkpoint to resume; starting from step 0", session.dir)
            decision = Decision(
                up_to_date=session.up_to_date,
                resuming=session.resuming and latest is not None,
                summary=session.summary,
                fingerprint=session.fingerprint,
            )
        except CocomixError as exc:
            error = exc
    shared = ranks.broadcast({"decision": decision, "error": None if error is None else str(error)})
    if error is not None:
        raise error
    if shared["error"] is not None:
        raise OtherRankError(shared["error"])
    return session, shared["decision"]


# --- inputs ---------------------------------------------------------------------------------------------


def _training_data(
    cfg: Config,
    reading: contextlib.ExitStack,
    token_store: TokenStore,
    prepare_fingerprint: str,
    online: bool,
    device,
) -> TrainingData:
    """The token blocks, the objective, and what it reads: cached targets, or the teacher and SAE."""
    p = cfg.pretrain
    splits = {split: {"tokens": token_store.split(split)} for split in ("train", "val")}
    input_artifacts = {"prepare": prepare_fingerprint}
    n_concepts, inputs = 0, {}
    if online:
        online_models, n_concepts, inputs, more = _online_teacher(
            cfg, reading, token_store, prepare_fingerprint, device
        )
        objective = objective_for(cfg, online_models)
        input_artifacts.update(more)
    else:
        objective = objective_for(cfg)
    if objective.reads:
        store, store_fingerprint = _concept_store(cfg, reading, prepare_fingerprint, token_store)
        input_artifacts[EXTRACT_STAGE] = store_fingerprint
        n_concepts = objective.check_store(store, token_store)
        for split in splits:
            splits[split].update({name: store.split(split)[name] for name in objective.reads})
    if n_concepts and p.n_concepts and p.n_concepts != n_concepts:  # CoCoMix's concept head
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
        objective=objective,
        inputs=inputs,
    )


def _concept_store(
    cfg: Config, reading: contextlib.ExitStack, prepare_fingerprint: str, token_store: TokenStore
) -> tuple[ConceptStore, str]:
    p = cfg.pretrain
    flags = "".join(f" {need.option()}" for need in objective_spec(p.objective).needs if need.applies(p))
    hint = f"run `cocomix extract-concepts{flags}` first" + (
        ", or pass --online-teacher to compute targets in the loop" if p.objective == "cocomix" else ""
    )
    run_dir = Path(cfg.run.dir)
    if not cfg.sae.path:  # the targets come from this run's SAE: its settings must still be the config's
        refuse_changed_upstream(run_dir, TRAIN_SAE_STAGE, stage_inputs.train_sae(cfg))
    return open_extracted_concepts(
        reading,
        run_dir,
        expected=stage_inputs.extract_concepts(cfg),
        missing=f"Objective `{cfg.pretrain.objective}` reads cached teacher outputs, but {cfg.run.dir} "
        f"has no finished concept store: {hint}.",
        token_store=token_store,
        prepare_fingerprint=prepare_fingerprint,
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


def _model_config(cfg: Config, token_store: TokenStore, objective: Objective, n_concepts: int):
    from pipelines.model.gpt import preset

    p = cfg.pretrain
    overrides: dict[str, Any] = {
        "vocab_size": int(token_store.attrs["tokenizer"]["vocab_size"]),
        "context_length": token_store.block_size,
        **objective.model_overrides(n_concepts),
    }
    for name in ("n_layer", "n_head", "n_embd", "insert_layer"):
        if getattr(p, name):
            overrides[name] = getattr(p, name)
    try:
        return preset(p.preset, objective.variant, **overrides)
    except ValueError as exc:
        raise ConfigError(f"[pretrain] gives an invalid model: {exc}.") from None

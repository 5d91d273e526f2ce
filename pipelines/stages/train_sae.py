"""`train-sae`: a sparse autoencoder on the teacher's hook (`sae.architecture`, TopK by default), trained as
in Gao et al. (2024).

This stage owns what surrounds the training: the token store and the teacher it reads, the checks of the
token budget, the session (resume, fingerprint, manifest) and the summary. The trainer itself, with its
recipe, its dead-latent handling (`sae.dead_latents`) and its exact resume, is `pipelines.sae.trainer`.

Run it with `cocomix train-sae` (see its `--help`). Output: `train-sae/sae/`, a SAELens folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from pipelines.config.schema import Config
from pipelines.core import stage_inputs
from pipelines.core.assets import resolve_assets
from pipelines.core.devices import resolve_device
from pipelines.core.fingerprints import input_files
from pipelines.core.layout import TRAIN_SAE_STAGE, TRAINED_SAE
from pipelines.core.session import StageResult, StageSession, known_files
from pipelines.data.token_store import TokenStore, open_prepared_tokens
from pipelines.errors import ConfigError, InputError
from pipelines.sae.families import check_trainable
from pipelines.sae.trainer import SaeTrainer

STAGE = TRAIN_SAE_STAGE


def run(cfg: Config, *, force: bool = False, progress: bool = True) -> StageResult:
    cfg = resolve_assets(cfg)
    with contextlib.ExitStack() as reading:
        return _train(cfg, reading, force, progress)


def _train(cfg: Config, reading: contextlib.ExitStack, force: bool, progress: bool) -> StageResult:
    check_trainable(cfg.sae.architecture)
    device = resolve_device(cfg.sae.device, "sae.device")  # a GPU this machine lacks: said before any work
    run_dir = Path(cfg.run.dir)
    token_store, prepare_fingerprint = open_prepared_tokens(reading, run_dir, stage_inputs.prepare(cfg))
    if not cfg.teacher.model:
        raise ConfigError("`teacher.model` is not set. Set it to a hub id, a folder or a .gguf file.")
    _check_token_budget(cfg, token_store)
    files = input_files({"teacher.model": cfg.teacher.model}, known_files(run_dir, STAGE))
    with StageSession(
        run_dir,
        STAGE,
        stage_inputs.train_sae(cfg),
        files=files,
        input_artifacts={"prepare": prepare_fingerprint},
        force=force,
    ) as session:
        if session.up_to_date:
            return StageResult(STAGE, session.dir, True, session.summary, session.fingerprint)
        from pipelines.concepts.teacher import load_teacher_for

        teacher = load_teacher_for(cfg.teacher, device, token_store.attrs)
        trainer = SaeTrainer(cfg, teacher, token_store, session.dir, device, on_eval=session.update_progress)
        trainer.restore(resume=session.resuming)
        stopped = trainer.train(show_progress=progress)
        if stopped is not None:  # a signal: the checkpoint is saved, the stage stays resumable
            summary = dataclasses.asdict(stopped)
            return StageResult(STAGE, session.dir, False, summary, session.fingerprint, stopped=stopped)
        summary = trainer.finish()
        session.complete(summary, outputs=[TRAINED_SAE])
        return StageResult(STAGE, session.dir, False, summary, session.fingerprint)


# --- inputs ---------------------------------------------------------------------------------------


def _check_token_budget(cfg: Config, token_store: TokenStore) -> None:
    s = cfg.sae
    train_tokens = token_store.split("train").shape[0] * token_store.block_size
    val_tokens = token_store.split("val").shape[0] * token_store.block_size
    problems = []
    if s.buffer_tokens > train_tokens:
        problems.append(f"`sae.buffer_tokens` ({s.buffer_tokens:,}) exceeds them")
    if -(-s.train_tokens // s.batch_tokens) * s.batch_tokens > train_tokens:
        problems.append(f"`sae.train_tokens` ({s.train_tokens:,}, in whole batches) exceeds them")
    if problems:
        raise InputError(
            f"The token store has {train_tokens:,} training tokens: {' and '.join(problems)}. "
            "Lower the setting or prepare more text (`data.max_documents`, `data.max_tokens`)."
        )
    if val_tokens < token_store.block_size:
        raise InputError(
            "The token store has no validation block to evaluate the SAE on; raise `data.val_fraction`."
        )

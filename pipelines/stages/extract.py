"""`extract-concepts`: concept targets for every token of `tokens.zarr`, once, into `concepts.zarr`.

For each block the teacher gives the hidden state at the hook and the gradient of the next-token loss with
respect to it; the SAE and the chosen attribution turn them into the top-K concept ids and scores per token.
Work is cut into chunks of `extract.blocks_per_chunk` blocks. A chunk is done once all its arrays are written
and its marker (with a digest of what was written) is in `chunks/`; a resumed run verifies the markers,
recomputes what is missing or corrupt, and so ends byte-identical to an uninterrupted run. Workers take
disjoint chunks (`--shard i/n` jobs and torchrun ranks alike); whoever finishes last marks the store complete.

Run it with `cocomix extract-concepts` (see its `--help`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.concepts.targets import StoredHidden, load_teacher_and_sae, resolve_sae_path
from pipelines.config.schema import Config
from pipelines.core import distributed, stage_inputs
from pipelines.core.assets import resolve_assets
from pipelines.core.devices import resolve_device
from pipelines.core.fingerprints import fingerprint_path, input_files
from pipelines.core.layout import CHUNKS_DIR, CONCEPTS_STORE, EXTRACT_STAGE
from pipelines.core.session import StageResult, StageSession, known_files
from pipelines.data.concept_store import Chunk, ConceptStoreWriter, concept_layout
from pipelines.data.token_store import TokenStore, open_prepared_tokens
from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

STAGE = EXTRACT_STAGE


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"`--shard {text}`: expected I/N, e.g. `--shard 0/4`.") from None
        if not 0 <= index < count:
            raise ConfigError(f"`--shard {text}`: I must be in [0, N) (shards are numbered from 0).")
        return cls(index, count)


def run(cfg: Config, *, force: bool = False, progress: bool = True, shard: Shard = Shard()) -> StageResult:
    cfg = resolve_assets(cfg)
    with contextlib.ExitStack() as reading:
        return _extract(cfg, reading, force, progress, shard)


def _extract(
    cfg: Config, reading: contextlib.ExitStack, force: bool, progress: bool, shard: Shard
) -> StageResult:
    run_dir = Path(cfg.run.dir)
    token_store, prepare_fingerprint = open_prepared_tokens(reading, run_dir, stage_inputs.prepare(cfg))
    if not cfg.teacher.model and not cfg.extract.hidden_from:
        raise ConfigError("`teacher.model` is not set. Set it to a hub id, a folder or a .gguf file.")
    if cfg.extract.hidden_from and cfg.extract.store_teacher_topk:
        raise ConfigError(
            "`extract.store_teacher_topk` needs the teacher's logits; it cannot be combined with "
            "`extract.hidden_from`."
        )
    ranks = distributed.start(resolve_device(cfg.extract.device, "extract.device"), "extract.device")
    device = distributed.rank_device(resolve_device(cfg.extract.device, "extract.device"), ranks)
    workers = _Workers(shard, ranks)
    if force and shard.count > 1:
        raise ConfigError(
            "`--force` cannot be combined with `--shard`: clear the stage with one unsharded run."
        )
    cfg, trained_sae = resolve_sae_path(cfg, reading)
    source_artifacts = {"prepare": prepare_fingerprint, **trained_sae}
    roles = {"teacher.model": cfg.teacher.model, "teacher.tokenizer": cfg.teacher.tokenizer}
    files = input_files({**roles, "sae.path": cfg.sae.path}, known_files(run_dir, STAGE))
    if cfg.extract.hidden_from:
        source_artifacts["hidden_from"] = StoredHidden.fingerprint(Path(cfg.extract.hidden_from))
    inputs = {
        **stage_inputs.extract_concepts(cfg),
        # a trained SAE enters through its stage's fingerprint and file hashes, a local one by its files
        "sae.path": fingerprint_path(cfg.sae.path),
    }
    if workers.rank != 0:
        workers.barrier()  # rank 0 decides (and clears, with --force) first
    session = StageSession(
        run_dir,
        STAGE,
        inputs,
        files=files,
        input_artifacts=source_artifacts,
        force=force and workers.rank == 0,
        worker=workers.name,
    )
    with session:
        if workers.rank == 0:
            workers.barrier()
        if session.up_to_date:
            return StageResult(STAGE, session.dir, True, session.summary, session.fingerprint)
        teacher, sae = load_teacher_and_sae(cfg, token_store, prepare_fingerprint, device)
        writer = _open_writer(session, token_store, cfg, sae, teacher)
        mine = workers.mine(writer.plan)
        todo = [chunk for chunk in mine if not writer.verified_done(chunk)]
        started = time.monotonic()
        phase_seconds = _extract_chunks(writer, teacher, sae, todo, cfg, device, progress)
        elapsed = time.monotonic() - started
        workers.barrier()
        summary = {
            **writer.summary(todo, elapsed),
            "seconds": {k: round(v, 3) for k, v in phase_seconds.items()},
        }
        if workers.rank == 0:
            with session.manifest_lock():
                if writer.all_done() and session.reload().get("status") != "complete":
                    writer.finalize(_provenance(session, teacher, sae, prepare_fingerprint))
                    session.complete(summary, outputs=[CONCEPTS_STORE])
        return StageResult(STAGE, session.dir, False, summary, session.fingerprint)


# --- the work ---------------------------------------------------------------------------------------------


def _extract_chunks(
    writer, teacher, sae, todo: list[Chunk], cfg: Config, device, show_progress: bool
) -> dict[str, float]:
    """Compute and write `todo`; returns seconds spent in the teacher, the SAE + attribution, and storage."""
    import torch
    from tqdm.auto import tqdm

    from pipelines.sae.attribution import concept_targets

    seconds = dict.fromkeys(("teacher", "sae_and_attribution", "storage"), 0.0)
    clock = _Clock(device)
    blocks_per_batch = max(1, cfg.extract.tokens_per_batch // writer.block_size)
    bar = tqdm(
        total=sum(c.stop - c.start for c in todo) * writer.block_size,
        unit="tok",
        unit_scale=True,
        desc="extract-concepts",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    with bar:  # closed on an error too, before the error's line is printed
        for chunk in todo:
            blocks = torch.from_numpy(writer.tokens(chunk).astype(np.int64))
            parts: dict[str, list[np.ndarray]] = {}
            for start in range(0, len(blocks), blocks_per_batch):
                ids = blocks[start : start + blocks_per_batch].to(device)
                clock.start()
                if isinstance(teacher, StoredHidden):
                    teacher.at(chunk.split, chunk.start + start)
                out = teacher.hidden_and_grad(ids, top_tokens=cfg.extract.store_teacher_topk)
                seconds["teacher"] += clock.stop()
                B, T, D = out.hidden.shape
                with torch.no_grad():
                    targets = concept_targets(
                        sae,
                        out.hidden.float().reshape(B * T, D),
                        out.grad.float().reshape(B * T, D),
                        cfg.extract.concepts_per_token,
                        cfg.extract.attribution,
                    )
                seconds["sae_and_attribution"] += clock.stop()
                for name, tensor in _batch_arrays(out, targets, cfg, B, T).items():
                    parts.setdefault(name, []).append(_to_numpy(tensor))
                seconds["storage"] += clock.stop()
                bar.update(B * T)
            writer.write_chunk(chunk, {name: np.concatenate(arrays) for name, arrays in parts.items()})
            seconds["storage"] += clock.stop()
    return seconds


def _batch_arrays(out, targets, cfg: Config, B: int, T: int) -> dict:
    """The arrays stored for one batch of B blocks of T tokens, by store array name."""
    import torch

    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, -1] = False  # the last position has no next token
    valid &= targets.has_active.reshape(B, T).cpu()  # nor has a token without an active SAE latent
    arrays = {
        "concept_ids": targets.ids.reshape(B, T, -1),
        "concept_scores": targets.scores.reshape(B, T, -1),
        "valid": valid,
    }
    if cfg.extract.store_hidden:
        arrays["hidden"], arrays["grad"] = out.hidden, out.grad
    if cfg.extract.store_sae_topk:
        arrays["sae_ids"] = targets.sae_ids.reshape(B, T, -1)
        arrays["sae_acts"] = targets.sae_values.reshape(B, T, -1)
    if cfg.extract.store_teacher_topk:
        arrays["teacher_ids"], arrays["teacher_logprobs"] = out.top_ids, out.top_log_probs
    return arrays


def _to_numpy(tensor) -> np.ndarray:
    """A host copy of `tensor`; the store casts it to its array's dtype (`concept_layout`)."""
    import torch

    tensor = tensor.detach().cpu()
    # numpy has no bfloat16 (a bfloat16 teacher's hidden states): widen after the copy, which stays half-size.
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _open_writer(session: StageSession, token_store: TokenStore, cfg: Config, sae, teacher):
    from pipelines.sae.attribution import stored_sae_width

    vocab = token_store.attrs["tokenizer"]["vocab_size"]
    sae_width = stored_sae_width(sae, cfg.extract.concepts_per_token)
    layout = concept_layout(cfg.extract, sae.d_sae, sae_width, teacher.d_model, vocab)
    with session.manifest_lock():  # the first worker creates the store, the others open it
        writer = ConceptStoreWriter(
            session.dir / CONCEPTS_STORE,
            session.dir / CHUNKS_DIR,
            token_store,
            layout,
            cfg.extract.blocks_per_chunk,
        )
        session.reload().setdefault("progress", {})["chunks_total"] = len(writer.plan)
        session.update_progress(**session.manifest["progress"])
    return writer


def _provenance(session: StageSession, teacher, sae, prepare_fingerprint: str) -> dict[str, Any]:
    """What the finished store records of where its targets came from."""
    inputs = session.inputs
    return {
        "teacher": {
            "spec": teacher.spec,
            "layer": teacher.layer,
            "hook": teacher.hook,
            "vocab_size": getattr(teacher, "vocab_size", None),  # None for stored hidden states
        },
        "hidden_from": str(getattr(teacher, "path", "")),
        "sae": {
            "spec": inputs["sae.path"],
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "k": sae.k_per_token,  # None: active latents vary by token
            "architecture": sae.architecture,
        },
        "files": {f["path"]: f["sha256"] for f in session.files},
        "concepts_per_token": inputs["extract.concepts_per_token"],
        "attribution": inputs["extract.attribution"],
        "token_store_fingerprint": prepare_fingerprint,
    }


class _Clock:
    """Wall time between calls, synchronising CUDA so that time lands on the phase that spent it."""

    def __init__(self, device):
        import torch

        # This process's device: without one, synchronize waits on the current device (cuda:0 under torchrun).
        self.sync = (
            functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else (lambda: None)
        )
        self.last = time.perf_counter()

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def stop(self) -> float:
        self.sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


# --- workers ----------------------------------------------------------------------------------------------


@dataclass
class _Workers:
    """This process's place among `--shard` jobs and torchrun ranks; chunks are dealt round-robin."""

    shard: Shard
    ranks: distributed.Ranks

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def name(self) -> str | None:
        if self.shard.count == 1 and self.ranks.world == 1:
            return None
        return f"shard{self.shard.index}of{self.shard.count}-rank{self.rank}of{self.ranks.world}"

    def mine(self, plan: list[Chunk]) -> list[Chunk]:
        worker = self.shard.index * self.ranks.world + self.rank
        workers = self.shard.count * self.ranks.world
        return [chunk for i, chunk in enumerate(plan) if i % workers == worker]

    def barrier(self) -> None:
        self.ranks.barrier()

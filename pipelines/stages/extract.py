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
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.concepts.targets import StoredHidden, load_teacher_and_sae, resolve_sae_path
from pipelines.config.schema import Config
from pipelines.core import stage_inputs
from pipelines.core.assets import resolve_assets
from pipelines.core.devices import resolve_device
from pipelines.core.files import atomic_write_json, read_json
from pipelines.core.fingerprints import fingerprint_path, input_files
from pipelines.core.layout import CHUNKS_DIR, CONCEPTS_STORE, EXTRACT_STAGE
from pipelines.core.session import StageResult, StageSession, known_files
from pipelines.data.stores import TOKEN_SPLITS, TokenStore, open_prepared_tokens
from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

STAGE = EXTRACT_STAGE
CONCEPT_STORE_FORMAT = "cocomix-concepts/1"


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


@dataclass(frozen=True)
class Chunk:
    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


def run(
    cfg: Config, *, force: bool = False, progress: bool = True, shard: Shard = Shard()
) -> StageResult:
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
    device = resolve_device(cfg.extract.device)
    workers = _Workers.start(shard, device)
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
        writer = _ConceptWriter(session, token_store, cfg, sae, teacher)
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
                    writer.finalize(teacher, sae, prepare_fingerprint)
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
    for chunk in todo:
        blocks = torch.from_numpy(writer.tokens(chunk).astype(np.int64))
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(blocks), blocks_per_batch):
            ids = blocks[start : start + blocks_per_batch].to(device)
            clock.start()
            if isinstance(teacher, StoredHidden):
                teacher.at(chunk.split, chunk.start + start)
            out = teacher.hidden_and_grad(ids, with_log_probs=cfg.extract.store_teacher_topk > 0)
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
                parts.setdefault(name, []).append(tensor.detach().cpu().numpy())
            seconds["storage"] += clock.stop()
            bar.update(B * T)
        writer.write_chunk(chunk, {name: np.concatenate(arrays) for name, arrays in parts.items()})
        seconds["storage"] += clock.stop()
    bar.close()
    return seconds


def _batch_arrays(out, targets, cfg: Config, B: int, T: int) -> dict:
    """The arrays stored for one batch of B blocks of T tokens, by store array name."""
    import torch

    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, -1] = False  # the last position has no next token
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
        top = out.log_probs.topk(cfg.extract.store_teacher_topk, dim=-1)
        arrays["teacher_ids"], arrays["teacher_logprobs"] = top.indices, top.values
    return arrays


class _Clock:
    """Wall time between calls, synchronising CUDA so that time lands on the phase that spent it."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.last = time.perf_counter()

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def stop(self) -> float:
        self.sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class _ConceptWriter:
    """The concept store of one stage folder: its layout, chunk plan, writes, markers and completion."""

    def __init__(self, session: StageSession, token_store: TokenStore, cfg: Config, sae, teacher):
        self.session = session
        self.token_store = token_store
        self.path = session.dir / CONCEPTS_STORE
        self.chunks_dir = session.dir / CHUNKS_DIR
        self.block_size = token_store.block_size
        self.blocks_per_chunk = cfg.extract.blocks_per_chunk
        e = cfg.extract
        id_dtype = np.uint16 if sae.d_sae <= 1 << 16 else np.uint32
        vocab = token_store.attrs["tokenizer"]["vocab_size"]
        self.layout: dict[str, tuple[tuple[int, ...], Any]] = {
            "concept_ids": ((e.concepts_per_token,), id_dtype),
            "concept_scores": ((e.concepts_per_token,), np.float16),
            "valid": ((), np.bool_),
        }
        if e.store_hidden:
            self.layout["hidden"] = ((teacher.d_model,), np.float16)
            self.layout["grad"] = ((teacher.d_model,), np.float16)
        if e.store_sae_topk:
            self.layout["sae_ids"] = ((sae.k,), id_dtype)
            self.layout["sae_acts"] = ((sae.k,), np.float16)
        if e.store_teacher_topk:
            self.layout["teacher_ids"] = (
                (e.store_teacher_topk,),
                np.uint16 if vocab <= 1 << 16 else np.uint32,
            )
            self.layout["teacher_logprobs"] = ((e.store_teacher_topk,), np.float16)
        self.plan = [
            Chunk(split, i, start, min(start + self.blocks_per_chunk, self._rows(split)))
            for split in TOKEN_SPLITS
            for i, start in enumerate(range(0, self._rows(split), self.blocks_per_chunk))
        ]
        with session.manifest_lock():
            self.group = self._open_or_create()
            session.reload().setdefault("progress", {})["chunks_total"] = len(self.plan)
            session.update_progress(**session.manifest["progress"])

    def _rows(self, split: str) -> int:
        return self.token_store.split(split).shape[0]

    def _open_or_create(self):
        import shutil

        import zarr

        from pipelines.core.failpoints import kill_point

        self.chunks_dir.mkdir(exist_ok=True)
        if (self.path / "zarr.json").exists():
            group = zarr.open_group(str(self.path), mode="r+")
            if all(name in group.get(split, {}) for split in TOKEN_SPLITS for name in self.layout):
                return group
            # Left half-made by a version that created it in place: nothing was computed into it yet.
            log.warning("%s lacks some of its arrays; creating it again", self.path)
        # The empty skeleton is built beside the store and renamed into place, so that a kill while its
        # groups and arrays are being created leaves no half-made store for the next run to trip over.
        skeleton = self.path.with_name(self.path.name + ".creating")
        for leftover in (skeleton, self.path):
            shutil.rmtree(leftover, ignore_errors=True)
        group = zarr.open_group(str(skeleton), mode="w")
        kill_point(f"create:{CONCEPTS_STORE}")
        for split in TOKEN_SPLITS:
            sub = group.create_group(split)
            kill_point(f"create:{CONCEPTS_STORE}:{split}")
            for name, (tail, dtype) in self.layout.items():
                shape = (self._rows(split), self.block_size, *tail)
                sub.create_array(
                    name, shape=shape, chunks=(self.blocks_per_chunk, *shape[1:]), dtype=dtype, fill_value=0
                )
                kill_point(f"create:{CONCEPTS_STORE}:{split}/{name}")
        group.attrs.update({"format": CONCEPT_STORE_FORMAT, "complete": False})
        os.replace(skeleton, self.path)
        return zarr.open_group(str(self.path), mode="r+")

    def tokens(self, chunk: Chunk) -> np.ndarray:
        return self.token_store.split(chunk.split)[chunk.start : chunk.stop]

    def write_chunk(self, chunk: Chunk, arrays: dict[str, np.ndarray]) -> None:
        stored = {}
        for name, (_, dtype) in self.layout.items():
            stored[name] = arrays[name].astype(dtype)
            self.group[chunk.split][name][chunk.start : chunk.stop] = stored[name]
        # The marker goes last: a chunk without one is redone, whatever of it reached the disk.
        atomic_write_json(self.chunks_dir / f"{chunk.name}.json", {"digest": _digest(stored)})

    def verified_done(self, chunk: Chunk) -> bool:
        marker = read_json(self.chunks_dir / f"{chunk.name}.json")
        if marker is None:
            return False
        try:
            stored = {name: self.group[chunk.split][name][chunk.start : chunk.stop] for name in self.layout}
            intact = _digest(stored) == marker["digest"]
        except Exception as exc:  # a torn or corrupt Zarr chunk fails to decode
            log.warning("chunk %s of %s cannot be read (%s)", chunk.name, self.path, exc)
            intact = False
        if not intact:
            log.warning("chunk %s of %s is corrupted; recomputing it", chunk.name, self.path)
            (self.chunks_dir / f"{chunk.name}.json").unlink()
        return intact

    def all_done(self) -> bool:
        return all((self.chunks_dir / f"{chunk.name}.json").exists() for chunk in self.plan)

    def finalize(self, teacher, sae, prepare_fingerprint: str) -> None:
        cfg = self.session.inputs
        self.group.attrs.update(
            {
                "complete": True,
                "block_size": self.block_size,
                "teacher": {
                    "spec": teacher.spec,
                    "layer": teacher.layer,
                    "hook": teacher.hook,
                    "vocab_size": getattr(teacher, "vocab_size", None),  # None for stored hidden states
                },
                "hidden_from": str(getattr(teacher, "path", "")),
                "sae": {"spec": cfg["sae.path"], "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k},
                "files": {f["path"]: f["sha256"] for f in self.session.files},
                "concepts_per_token": cfg["extract.concepts_per_token"],
                "attribution": cfg["extract.attribution"],
                "token_store_fingerprint": prepare_fingerprint,
                "arrays": sorted(self.layout),
            }
        )

    def summary(self, computed: list[Chunk], elapsed: float) -> dict[str, Any]:
        done = sum((self.chunks_dir / f"{chunk.name}.json").exists() for chunk in self.plan)
        tokens = sum(self._rows(split) for split in TOKEN_SPLITS) * self.block_size
        computed_tokens = sum(chunk.stop - chunk.start for chunk in computed) * self.block_size
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "store": str(self.path),
            "chunks_total": len(self.plan),
            "chunks_done": done,
            "chunks_computed_here": len(computed),
            "tokens": tokens,
            "bytes": size,
            "bytes_per_token": round(size / tokens, 3) if tokens else None,
            "tokens_per_s": round(computed_tokens / elapsed, 1) if elapsed > 0 and computed else None,
        }


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


# --- workers ----------------------------------------------------------------------------------------------


@dataclass
class _Workers:
    """This process's place among `--shard` jobs and torchrun ranks; chunks are dealt round-robin."""

    shard: Shard
    rank: int
    world: int

    @classmethod
    def start(cls, shard: Shard, device) -> _Workers:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            return cls(shard, dist.get_rank(), world)
        return cls(shard, 0, 1)

    @property
    def name(self) -> str | None:
        if self.shard.count == 1 and self.world == 1:
            return None
        return f"shard{self.shard.index}of{self.shard.count}-rank{self.rank}of{self.world}"

    def mine(self, plan: list[Chunk]) -> list[Chunk]:
        worker, workers = self.shard.index * self.world + self.rank, self.shard.count * self.world
        return [chunk for i, chunk in enumerate(plan) if i % workers == worker]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

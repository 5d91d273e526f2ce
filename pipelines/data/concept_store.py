"""The Zarr concept store that `extract-concepts` writes and `pretrain`, the dictionary and the steering demo
read: the one writer and the one reader of `concepts.zarr`.

A Zarr v3 group with one subgroup per split (`train`, `val`), each holding per-token arrays of shape
`[n_blocks, block_size, ...]` aligned with the token store: `concept_ids`, `concept_scores` and `valid`
always; `hidden` and `grad`, `sae_ids` and `sae_acts`, `teacher_ids` and `teacher_logprobs` when asked for.
It is written in chunks of blocks; a chunk is done once its arrays are written and its marker (a digest of
what was written) is in the stage's `chunks/` folder, so a resumed extraction verifies the markers and
recomputes only what is missing or corrupt. The group attributes name the teacher, the SAE, the token store
it was computed from and the arrays it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config.schema import ExtractConfig
from pipelines.core.files import atomic_write_json, read_json
from pipelines.data.token_store import TOKEN_SPLITS, TokenStore
from pipelines.errors import InputError

log = logging.getLogger(__name__)

CONCEPT_STORE_FORMAT = "cocomix-concepts/1"
# Per-token arrays: name -> (trailing shape, dtype).
Layout = dict[str, tuple[tuple[int, ...], Any]]


def concept_layout(e: ExtractConfig, d_sae: int, sae_k: int, teacher_width: int, vocab_size: int) -> Layout:
    """The arrays an extraction with settings `e` stores, in the smallest dtypes that hold them."""
    id_dtype = np.uint16 if d_sae <= 1 << 16 else np.uint32
    layout: Layout = {
        "concept_ids": ((e.concepts_per_token,), id_dtype),
        "concept_scores": ((e.concepts_per_token,), np.float16),
        "valid": ((), np.bool_),
    }
    if e.store_hidden:
        layout["hidden"] = ((teacher_width,), np.float16)
        layout["grad"] = ((teacher_width,), np.float16)
    if e.store_sae_topk:
        layout["sae_ids"] = ((sae_k,), id_dtype)
        layout["sae_acts"] = ((sae_k,), np.float16)
    if e.store_teacher_topk:
        token_ids = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        layout["teacher_ids"] = ((e.store_teacher_topk,), token_ids)
        layout["teacher_logprobs"] = ((e.store_teacher_topk,), np.float16)
    return layout


@dataclass(frozen=True)
class Chunk:
    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


class ConceptStoreWriter:
    """Writes `concepts.zarr` chunk by chunk: its layout, chunk plan, writes, markers and completion.

    Create it under the stage's manifest lock when several workers share the store: the first one builds the
    empty store, the others open it.
    """

    def __init__(
        self, path: Path, chunks_dir: Path, token_store: TokenStore, layout: Layout, blocks_per_chunk: int
    ):
        self.path, self.chunks_dir, self.token_store = Path(path), Path(chunks_dir), token_store
        self.layout, self.blocks_per_chunk = layout, blocks_per_chunk
        self.block_size = token_store.block_size
        self.plan = [
            Chunk(split, i, start, min(start + blocks_per_chunk, self._rows(split)))
            for split in TOKEN_SPLITS
            for i, start in enumerate(range(0, self._rows(split), blocks_per_chunk))
        ]
        self.group = self._open_or_create()

    def _rows(self, split: str) -> int:
        return self.token_store.split(split).shape[0]

    def _open_or_create(self):
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
        kill_point(f"create:{self.path.name}")
        for split in TOKEN_SPLITS:
            sub = group.create_group(split)
            kill_point(f"create:{self.path.name}:{split}")
            for name, (tail, dtype) in self.layout.items():
                shape = (self._rows(split), self.block_size, *tail)
                sub.create_array(
                    name, shape=shape, chunks=(self.blocks_per_chunk, *shape[1:]), dtype=dtype, fill_value=0
                )
                kill_point(f"create:{self.path.name}:{split}/{name}")
        group.attrs.update({"format": CONCEPT_STORE_FORMAT, "complete": False})
        os.replace(skeleton, self.path)
        return zarr.open_group(str(self.path), mode="r+")

    def tokens(self, chunk: Chunk) -> np.ndarray:
        return self.token_store.split(chunk.split)[chunk.start : chunk.stop]

    def write_chunk(self, chunk: Chunk, arrays: Mapping[str, np.ndarray]) -> None:
        stored = {}
        for name, (_, dtype) in self.layout.items():
            stored[name] = arrays[name].astype(dtype)
            self.group[chunk.split][name][chunk.start : chunk.stop] = stored[name]
        # The marker goes last: a chunk without one is redone, whatever of it reached the disk.
        atomic_write_json(self._marker(chunk), {"digest": _digest(stored)})

    def verified_done(self, chunk: Chunk) -> bool:
        """Whether `chunk` is written and reads back as written; a damaged chunk loses its marker."""
        marker = read_json(self._marker(chunk))
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
            self._marker(chunk).unlink()
        return intact

    def done(self) -> int:
        return sum(self._marker(chunk).exists() for chunk in self.plan)

    def all_done(self) -> bool:
        return self.done() == len(self.plan)

    def finalize(self, attrs: Mapping[str, Any]) -> None:
        """Mark the store complete, with what it was computed from (`attrs`) and the arrays it holds."""
        self.group.attrs.update(
            {**attrs, "complete": True, "block_size": self.block_size, "arrays": sorted(self.layout)}
        )

    def summary(self, computed: list[Chunk], elapsed: float) -> dict[str, Any]:
        tokens = sum(self._rows(split) for split in TOKEN_SPLITS) * self.block_size
        computed_tokens = sum(chunk.stop - chunk.start for chunk in computed) * self.block_size
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "store": str(self.path),
            "chunks_total": len(self.plan),
            "chunks_done": self.done(),
            "chunks_computed_here": len(computed),
            "tokens": tokens,
            "bytes": size,
            "bytes_per_token": round(size / tokens, 3) if tokens else None,
            "tokens_per_s": round(computed_tokens / elapsed, 1) if elapsed > 0 and computed else None,
        }

    def _marker(self, chunk: Chunk) -> Path:
        return self.chunks_dir / f"{chunk.name}.json"


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


@dataclass
class ConceptStore:
    """Read access to a finished concept store."""

    path: Path
    group: Any

    @classmethod
    def open(cls, path: Path) -> ConceptStore:
        import zarr

        return cls(Path(path), zarr.open_group(str(path), mode="r"))

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def arrays(self) -> list[str]:
        """The per-token arrays it holds (`concept_ids`, `sae_ids`, `teacher_ids`, ...)."""
        return list(self.group.attrs.get("arrays", []))

    @property
    def n_concepts(self) -> int:
        """The width of the SAE the targets come from."""
        return int(self.group.attrs["sae"]["d_sae"])

    def split(self, name: str):
        """The Zarr group of one split; `store.split("train")["concept_ids"]` is an array."""
        if name not in TOKEN_SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {TOKEN_SPLITS}")
        return self.group[name]


def open_extracted_concepts(
    reading: contextlib.ExitStack,
    run_dir: Path,
    expected: Mapping[str, Any] | None = None,
    missing: str | None = None,
    token_store: TokenStore | None = None,
    prepare_fingerprint: str | None = None,
) -> tuple[ConceptStore, str]:
    """The finished concept store of a run and the `extract-concepts` fingerprint.

    Held against `extract-concepts --force` until `reading` closes, refused when damaged or extracted with
    other values of the `expected` settings, and, given the token store (and its fingerprint), refused
    when it was computed from another one or does not match its shape.
    """
    from pipelines.core.layout import CONCEPTS_STORE, EXTRACT_STAGE
    from pipelines.core.session import finished_upstream

    finished = reading.enter_context(
        finished_upstream(run_dir, EXTRACT_STAGE, CONCEPTS_STORE, expected=expected, missing=missing)
    )
    store = ConceptStore.open(finished.path)
    if prepare_fingerprint is not None and store.attrs.get("token_store_fingerprint") != prepare_fingerprint:
        raise InputError(
            f"{store.path} was extracted from a different token store than {token_store.path}. "
            "Run `cocomix extract-concepts --force` to recompute it."
        )
    for split in TOKEN_SPLITS if token_store is not None else ():
        shape = store.split(split)["valid"].shape[:2]
        if shape != token_store.split(split).shape:
            raise InputError(
                f"{store.path} `{split}` has shape {shape} but the token store's is "
                f"{token_store.split(split).shape}. Run `cocomix extract-concepts --force`."
            )
    return store, finished.fingerprint

"""The Zarr token store that `prepare` writes and every later stage reads.

`tokens.zarr` is a Zarr v3 group with two arrays, `train` and `val`, of shape `[n_blocks, block_size]` in
the smallest unsigned dtype that holds the vocabulary, and group attributes that name the tokenizer
(spec, vocabulary hash, separator), the corpus and the counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import StageError

TOKEN_SPLITS = ("train", "val")
TOKEN_STORE_FORMAT = "cocomix-tokens/1"
# Chunks of about this many bytes: large enough to compress well, small enough that a random block read
# during training decompresses little more than it needs.
TARGET_CHUNK_BYTES = 1 << 18


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} does not fit in uint32")


def chunk_rows(block_size: int, dtype: np.dtype) -> int:
    return max(1, TARGET_CHUNK_BYTES // (block_size * np.dtype(dtype).itemsize))


def create_token_store(path: Path, block_size: int, dtype: np.dtype):
    """An empty store (overwriting any at `path`) with zero-row `train` and `val` arrays."""
    import zarr

    from pipelines.core.failpoints import kill_point

    group = zarr.open_group(str(path), mode="w")
    kill_point(f"create:{path.name}")
    rows = chunk_rows(block_size, dtype)
    for split in TOKEN_SPLITS:
        group.create_array(split, shape=(0, block_size), chunks=(rows, block_size), dtype=dtype, fill_value=0)
        kill_point(f"create:{path.name}:{split}")
    group.attrs.update({"format": TOKEN_STORE_FORMAT, "complete": False})
    return group


@dataclass
class TokenStore:
    """Read access to a finished token store."""

    path: Path
    group: Any

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def block_size(self) -> int:
        return int(self.attrs["block_size"])

    def split(self, name: str):
        """The Zarr array of one split; slice it to read blocks as numpy."""
        if name not in TOKEN_SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {TOKEN_SPLITS}")
        return self.group[name]


def open_prepared_tokens(
    reading: contextlib.ExitStack, run_dir: Path, expected: Mapping[str, Any] | None = None
) -> tuple[TokenStore, str]:
    """The finished token store of a run and the `prepare` fingerprint that later stages depend on.

    The store stays held against `prepare --force` until `reading` closes. It is refused when a file of
    it is damaged, and when it was prepared with other values of the `expected` settings (the `data`
    settings as the config has them now).
    """
    from pipelines.core.layout import PREPARE_STAGE, TOKENS_STORE
    from pipelines.core.session import finished_upstream

    stage_dir = Path(run_dir) / PREPARE_STAGE
    prepared = reading.enter_context(
        finished_upstream(
            stage_dir.parent,
            stage_dir.name,
            TOKENS_STORE,
            expected=expected,
            missing=f"No finished token store in {stage_dir}. Run `cocomix prepare` first.",
        )
    )
    return open_token_store(prepared.path), prepared.fingerprint


def open_token_store(path: Path) -> TokenStore:
    """Open a complete store, or say which command makes one."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StageError(f"No token store at {path}. Run `cocomix prepare` first.")
    group = zarr.open_group(str(path), mode="r")
    if group.attrs.get("format") != TOKEN_STORE_FORMAT or not group.attrs.get("complete"):
        raise StageError(f"The token store at {path} is unfinished. Run `cocomix prepare` to complete it.")
    return TokenStore(path=path, group=group)

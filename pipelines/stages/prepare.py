"""`prepare`: a text corpus -> `tokens.zarr`, the token blocks every later stage reads.

Documents are streamed in corpus order, tokenized in batches with the fast tokenizer, each followed by the
document separator, and routed whole to `train` or `val` by a hash of their text. Each split is one token
stream cut into `block_size` blocks; a final partial block is dropped. Only whole Zarr chunks are written
before the end, and a resume point (documents consumed, rows written, the tokens not yet in a chunk) is
committed after them, so a run killed at any moment resumes to byte-identical arrays.

Run it with `cocomix prepare` (see `cocomix prepare --help`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config.schema import Config, DataConfig
from pipelines.core import stage_inputs
from pipelines.core.assets import resolve_assets
from pipelines.core.files import atomic_write_bytes, atomic_write_json, read_json
from pipelines.core.fingerprints import input_files
from pipelines.core.layout import PREPARE_STAGE, TOKENS_STORE
from pipelines.core.session import StageResult, StageSession, known_files
from pipelines.data.corpus import Corpus, resolve_corpus
from pipelines.data.token_store import TOKEN_SPLITS, chunk_rows, create_token_store, token_dtype
from pipelines.data.tokenizer import document_separator, load_tokenizer, tokenizer_files, vocab_hash
from pipelines.errors import InputError, first_line

log = logging.getLogger(__name__)

STAGE = PREPARE_STAGE
RESUME_FILE = "resume.json"


def run(cfg: Config, *, force: bool = False, progress: bool = True) -> StageResult:
    cfg = resolve_assets(cfg)
    run_dir = Path(cfg.run.dir)
    corpus = resolve_corpus(cfg.data)
    files = input_files(
        {"data.source": corpus.files, "data.tokenizer": tokenizer_files(cfg.data.tokenizer)},
        known_files(run_dir, STAGE),
    )
    inputs = stage_inputs.prepare(cfg)
    with StageSession(run_dir, STAGE, inputs, files=files, force=force) as session:
        if not session.up_to_date:
            summary = _tokenize_corpus(cfg, corpus, session, progress)
            session.complete(summary, outputs=[TOKENS_STORE])
        return StageResult(STAGE, session.dir, session.up_to_date, session.summary, session.fingerprint)


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Hold a document out by a hash of its text: stable across runs, orders and duplicates."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


# --- the stream -------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Everything needed to continue the stream after a kill (saved as the resume point)."""

    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    split_documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_SPLITS, 0))
    rows_written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_SPLITS, 0))
    commit: int = 0


def _tokenize_corpus(cfg: Config, corpus: Corpus, session: StageSession, show_progress: bool) -> dict:
    data = cfg.data
    tokenizer = load_tokenizer(data.tokenizer)
    separator, separator_id = document_separator(tokenizer, data.eos_token)
    dtype = token_dtype(tokenizer.vocab_size)
    backend = tokenizer.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    writer = _StoreWriter(session.dir, data.block_size, dtype)
    state = writer.open(resume=session.resuming)
    if state.documents:
        log.info("resuming prepare after %d documents (%d tokens)", state.documents, state.tokens)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=data.max_tokens or None,
        initial=state.tokens,
        unit="tok",
        unit_scale=True,
        desc="prepare",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    with bar:  # closed on an error too, before the error's line is printed
        started, tokens_at_start, last_commit = time.monotonic(), state.tokens, time.monotonic()
        for texts in corpus.iter_batches(data.batch_documents, state.documents, data.max_documents):
            streams, cap_reached = _route_batch(texts, encode, separator_id, state, data)
            for split, ids in streams.items():
                writer.add(split, np.asarray(ids, dtype=dtype))
            bar.update(state.tokens - bar.n)
            if cap_reached:
                break
            if time.monotonic() - last_commit >= data.commit_interval_s:
                writer.commit(state)
                session.update_progress(
                    documents=state.documents, tokens=state.tokens, **_block_counts(writer)
                )
                last_commit = time.monotonic()
    elapsed = time.monotonic() - started

    tail = writer.finish()
    _check_sizes(cfg, corpus, state, writer)
    counts = _block_counts(writer)
    summary = {
        "store": str(writer.path),
        "documents": state.documents,
        "empty_documents": state.empty_documents,
        "train_documents": state.split_documents["train"],
        "val_documents": state.split_documents["val"],
        "tokens_read": state.tokens,
        **counts,
        "train_tokens": counts["train_blocks"] * data.block_size,
        "val_tokens": counts["val_blocks"] * data.block_size,
        "dropped_tail_tokens": tail,
        "dtype": dtype.name,
        "tokens_per_s": round((state.tokens - tokens_at_start) / elapsed, 1) if elapsed > 0 else None,
    }
    writer.finalize_attrs(
        {
            "block_size": data.block_size,
            "dtype": dtype.name,
            "tokenizer": {
                "spec": data.tokenizer,
                "name_or_path": tokenizer.name_or_path,
                "vocab_hash": vocab_hash(tokenizer),
                "vocab_size": tokenizer.vocab_size,
                "separator": separator,
                "separator_id": separator_id,
            },
            "corpus": {
                "source": corpus.source,
                "text_field": corpus.text_field,
                "files": [{"path": f["path"], "sha256": f["sha256"]} for f in session.files],
                "val_fraction": data.val_fraction,
                "max_documents": data.max_documents,
                "max_tokens": data.max_tokens,
            },
            "counts": {k: v for k, v in summary.items() if k not in ("store", "dtype", "tokens_per_s")},
        }
    )
    return summary


def _route_batch(
    texts: list[Any], encode, separator_id: int, state: _Progress, data: DataConfig
) -> tuple[dict[str, list[int]], bool]:
    """Tokenize one batch of documents into per-split token lists; True once `max_tokens` is reached."""
    kept = [t for t in texts if isinstance(t, str) and t]
    state.empty_documents += len(texts) - len(kept)
    state.documents += len(texts) - len(kept)
    streams: dict[str, list[int]] = {split: [] for split in TOKEN_SPLITS}
    for text, encoding in zip(kept, encode(kept, add_special_tokens=False), strict=True):
        ids = encoding.ids
        ids.append(separator_id)
        cap_reached = bool(data.max_tokens) and state.tokens + len(ids) >= data.max_tokens
        if cap_reached:
            ids = ids[: data.max_tokens - state.tokens]
        split = "val" if is_validation_document(text, data.val_fraction) else "train"
        streams[split].extend(ids)
        state.split_documents[split] += 1
        state.tokens += len(ids)
        state.documents += 1
        if cap_reached:
            return streams, True
    return streams, False


def _block_counts(writer: _StoreWriter) -> dict[str, int]:
    return {f"{split}_blocks": writer.blocks(split) for split in TOKEN_SPLITS}


def _check_sizes(cfg: Config, corpus: Corpus, state: _Progress, writer: _StoreWriter) -> None:
    block_size = cfg.data.block_size
    if state.tokens == 0:
        raise InputError(
            f"The corpus {corpus.source} holds no text ({state.documents} documents, all empty)."
        )
    if writer.blocks("train") == 0:
        raise InputError(
            f"`data.block_size` ({block_size}) is larger than the training text of {corpus.source} "
            f"({writer.tokens_seen['train']} tokens). Lower `data.block_size` or add text."
        )
    if cfg.data.val_fraction > 0 and writer.blocks("val") == 0:
        raise InputError(
            f"No validation block: {writer.tokens_seen['val']} held-out tokens is less than "
            f"`data.block_size` ({block_size}). Raise `data.val_fraction` or add text."
        )


# --- writing ----------------------------------------------------------------------------------------------


class _StoreWriter:
    """Appends token streams to the store in whole chunks and commits resume points between them."""

    def __init__(self, stage_dir: Path, block_size: int, dtype: np.dtype):
        self.stage_dir = stage_dir
        self.path = stage_dir / TOKENS_STORE
        self.block_size = block_size
        self.dtype = dtype
        self.rows_per_chunk = chunk_rows(block_size, dtype)
        self.pending: dict[str, list[np.ndarray]] = {split: [] for split in TOKEN_SPLITS}
        self.rows: dict[str, int] = dict.fromkeys(TOKEN_SPLITS, 0)
        self.tokens_seen: dict[str, int] = dict.fromkeys(TOKEN_SPLITS, 0)
        self.group = None

    def open(self, resume: bool) -> _Progress:
        import zarr

        point = self._resume_point() if resume else None
        if point is None:
            self.group = create_token_store(self.path, self.block_size, self.dtype)
            return _Progress()
        self.group = zarr.open_group(str(self.path), mode="r+")
        for split in TOKEN_SPLITS:
            self.rows[split] = point["rows_written"][split]
            # Drop whatever a killed run wrote after its last resume point; it is written again.
            self.group[split].resize((self.rows[split], self.block_size))
            self.pending[split] = [point["pending"][split].astype(self.dtype)]
        self.tokens_seen = point["tokens_seen"]
        progress = _Progress(**{k: point[k] for k in _Progress.__dataclass_fields__})
        return progress

    def add(self, split: str, tokens: np.ndarray) -> None:
        if len(tokens):
            self.pending[split].append(tokens)
            self.tokens_seen[split] += len(tokens)
        chunk_tokens = self.rows_per_chunk * self.block_size
        if sum(len(t) for t in self.pending[split]) >= chunk_tokens:
            stream = np.concatenate(self.pending[split])
            whole = len(stream) // chunk_tokens * chunk_tokens
            self._write_rows(split, stream[:whole])
            self.pending[split] = [stream[whole:]]

    def _write_rows(self, split: str, stream: np.ndarray) -> None:
        rows = len(stream) // self.block_size
        if rows == 0:
            return
        array = self.group[split]
        start = self.rows[split]
        array.resize((start + rows, self.block_size))
        array[start : start + rows] = stream[: rows * self.block_size].reshape(rows, self.block_size)
        self.rows[split] = start + rows

    def commit(self, state: _Progress) -> None:
        """Save a resume point: chunks on disk first, then the pending tokens, then the pointer to them."""
        state.commit += 1
        state.rows_written = dict(self.rows)
        buffer = io.BytesIO()
        np.savez(buffer, **{split: self._pending_stream(split) for split in TOKEN_SPLITS})
        pending_file = f"resume-{state.commit}.npz"
        atomic_write_bytes(self.stage_dir / pending_file, buffer.getvalue())
        point = {**state.__dict__, "pending_file": pending_file, "tokens_seen": self.tokens_seen}
        atomic_write_json(self.stage_dir / RESUME_FILE, point)
        for old in self.stage_dir.glob("resume-*.npz"):
            if old.name != pending_file:
                old.unlink()

    def _pending_stream(self, split: str) -> np.ndarray:
        parts = self.pending[split]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def _resume_point(self) -> dict[str, Any] | None:
        """The last resume point with its pending tokens, or None when there is none or it is damaged
        (then the stream starts over: the store is a pure function of the corpus, so the result is the
        same)."""
        path = self.stage_dir / RESUME_FILE
        try:
            point = read_json(path)
            if point is None:
                return None
            needed = {*_Progress.__dataclass_fields__, "rows_written", "tokens_seen", "pending_file"}
            if not needed <= set(point):
                raise KeyError(f"no {', '.join(sorted(needed - set(point)))}")
            with np.load(self.stage_dir / point["pending_file"]) as pending:
                point["pending"] = {split: pending[split] for split in TOKEN_SPLITS}
            return point
        except Exception as exc:  # torn JSON, a missing or torn .npz (zipfile, OSError, KeyError, ...)
            log.warning(
                "the resume point %s is damaged (%s); tokenizing from the start", path, first_line(exc)
            )
            return None

    def finish(self) -> int:
        """Write the last rows of each split; returns how many tail tokens did not fill a block."""
        dropped = 0
        for split in TOKEN_SPLITS:
            stream = self._pending_stream(split)
            self._write_rows(split, stream)
            dropped += len(stream) % self.block_size
            self.pending[split] = []
        return dropped

    def blocks(self, split: str) -> int:
        return self.rows[split]

    def finalize_attrs(self, attrs: dict[str, Any]) -> None:
        self.group.attrs.update({**attrs, "complete": True})
        (self.stage_dir / RESUME_FILE).unlink(missing_ok=True)
        for old in self.stage_dir.glob("resume-*.npz"):
            old.unlink()

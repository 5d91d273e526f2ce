"""Reading a text corpus as a deterministic stream of documents, from local files or the HuggingFace hub.

Everything goes through `datasets` in streaming mode, so memory stays bounded whatever the corpus size.
Local sources are resolved to a sorted file list up front, so the document order (and with it every
token block) depends only on the files, never on the filesystem's listing order.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipelines.config.schema import DataConfig
from pipelines.errors import CocomixError, ConfigError, InputError, first_line

log = logging.getLogger(__name__)

# File suffix (after any compression suffix) -> `datasets` packaged builder.
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: either local files read by one builder, or a hub dataset id."""

    source: str
    text_field: str
    files: tuple[Path, ...] = ()
    builder: str = ""
    hub_id: str = ""
    hub_subset: str = ""
    hub_split: str = "train"
    txt_sample_by: str = "paragraph"

    @property
    def is_local(self) -> bool:
        return bool(self.files)

    def iter_batches(
        self, batch_documents: int, skip_documents: int = 0, max_documents: int = 0
    ) -> Iterator[list[Any]]:
        """Lists of document texts in corpus order, starting after `skip_documents`."""
        limit = max_documents or None
        seen = 0
        try:
            dataset = self._open()
            if dataset is None:
                return
            for batch in dataset.iter(batch_size=batch_documents):
                if self.text_field not in batch:
                    raise InputError(self._missing_field_message(list(batch)))
                texts = batch[self.text_field]
                start, seen = seen, seen + len(texts)
                if limit is not None and start >= limit:
                    return
                offset = max(0, skip_documents - start)
                texts = texts[offset : (limit - start) if limit is not None else None]
                self._check_texts(texts, start + offset)
                if texts:
                    yield texts
        except CocomixError:
            raise
        except Exception as exc:
            raise self._explain_read_error(exc) from None

    def _open(self):
        import datasets

        from pipelines.core.hub import quiet_hub

        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # read errors are re-raised, explained
        datasets.disable_progress_bars()
        if self.is_local:
            # `datasets` cannot open a 0-byte file; such a file holds no documents.
            files = [str(f) for f in self.files if f.stat().st_size > 0]
            if not files:
                return None
            kwargs = {"sample_by": self.txt_sample_by} if self.builder == "text" else {}
            return datasets.load_dataset(
                self.builder, data_files=files, split="train", streaming=True, **kwargs
            )
        try:
            with quiet_hub():
                return datasets.load_dataset(
                    self.hub_id, self.hub_subset or None, split=self.hub_split, streaming=True
                )
        except Exception as exc:
            raise InputError(
                f"Cannot open dataset `{self.hub_id}` from the HuggingFace hub ({first_line(exc)}). "
                "Check `data.source` (and `data.hf_subset`, `data.split`), or point it at local files."
            ) from None

    def _missing_field_message(self, fields: list[str]) -> str:
        where = self.files[0] if self.is_local else self.hub_id
        return (
            f"`data.text_field` {self.text_field!r} is not a field of {where}; fields found: "
            f"{', '.join(fields)}. Set `data.text_field` to one of them."
        )

    def _check_texts(self, texts: list[Any], first_document: int) -> None:
        """Refuse a document whose text is not a string: `prepare` would count a number, a list or a null as
        an empty document and go on, so a wrong `data.text_field` or a broken export would pass unseen."""
        for index, value in enumerate(texts):
            # A hub dataset's nulls stay empty documents: its user cannot edit the rows.
            if not isinstance(value, str) and (self.is_local or value is not None):
                raise self._not_text_error(first_document + index, value)

    def _not_text_error(self, document: int, value: Any) -> CocomixError:
        bad = self._first_bad_record()
        if bad is not None:
            return bad
        where = ", ".join(str(f) for f in self.files[:3]) if self.is_local else self.hub_id
        return InputError(
            f"Document {document + 1} of {where}: `data.text_field` {self.text_field!r} holds "
            f"{_json_kind(value)}, not text. Make it a string, or set `data.text_field` to the field that "
            "holds the text."
        )

    def _explain_read_error(self, exc: Exception) -> CocomixError:
        bad = self._first_bad_record()
        if bad is not None:
            return bad
        where = ", ".join(str(f) for f in self.files[:3]) if self.is_local else self.hub_id
        return InputError(f"Cannot read corpus {where}: {first_line(exc)}.")

    def _first_bad_record(self) -> InputError | None:
        """The first line of the JSON-lines files that is not a record with a text, as `file:line: why`."""
        if self.builder != "json":
            return None
        for path in self.files:
            bad = _first_bad_json_line(path, self.text_field)
            if bad:
                line_no, problem = bad
                return InputError(f"{path}:{line_no}: {problem}")
        return None


def resolve_corpus(cfg: DataConfig) -> Corpus:
    """Turn `data.source` into a `Corpus`, with one clear error for each way it can be wrong."""
    source = cfg.source.strip()
    if not source:
        raise ConfigError("`data.source` is not set. Set it in cocomix.toml or pass `--source PATH`.")
    common = {"source": source, "text_field": cfg.text_field}
    if source.startswith(HUB_PREFIX) or not _looks_local(source):
        if cfg.exclude:
            raise ConfigError(
                f"`data.exclude` leaves out files of a local `data.source`; {source!r} is a hub dataset. "
                "Set `data.exclude = []`."
            )
        hub_id = source.removeprefix(HUB_PREFIX)
        return Corpus(hub_id=hub_id, hub_subset=cfg.hf_subset, hub_split=cfg.split, **common)
    files = _without_excluded(_expand(source), cfg.exclude, source)
    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise InputError(
            f"`data.source` {source!r} mixes file formats ({', '.join(sorted(builders))}). "
            "Point it at files of one format."
        )
    return Corpus(files=tuple(files), builder=builders.pop(), txt_sample_by=cfg.txt_sample_by, **common)


def _looks_local(source: str) -> bool:
    path = Path(source).expanduser()
    return (
        path.exists()
        or glob.has_magic(source)
        or source.startswith(("/", ".", "~"))
        or _strip_compression(path).suffix in BUILDERS
    )


def _expand(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"`data.source` glob {source!r} matches no files. Check the pattern.")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _strip_compression(p).suffix in BUILDERS)
        if not files:
            raise InputError(f"`data.source` folder {source} holds no {'/'.join(BUILDERS)} files.")
        return files
    if not path.is_file():
        raise InputError(f"`data.source` file {source} does not exist. Check the path.")
    return [path]


def _without_excluded(files: list[Path], patterns: list[str], source: str) -> list[Path]:
    """`files` minus those whose name matches a pattern of `data.exclude`; a pattern that matches nothing is
    a typo that would silently train on the text it was meant to hold out."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(f.name, pattern) for f in files):
            names = ", ".join(f.name for f in files[:5]) + (", ..." if len(files) > 5 else "")
            raise ConfigError(
                f"`data.exclude` pattern {pattern!r} matches none of the {len(files)} files of `data.source` "
                f"{source!r} ({names}). Patterns match file names, e.g. `tempest_gut.txt` or `*_test.jsonl`."
            )
    kept = [f for f in files if not any(fnmatch.fnmatchcase(f.name, p) for p in patterns)]
    if not kept:
        raise ConfigError(f"`data.exclude` leaves none of the files of `data.source` {source!r}.")
    return kept


def _strip_compression(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in COMPRESSION_SUFFIXES else path


def _builder_for(path: Path) -> str:
    suffix = _strip_compression(path).suffix
    if suffix not in BUILDERS:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; supported: "
            f"{', '.join(BUILDERS)} (optionally {', '.join(COMPRESSION_SUFFIXES)})."
        )
    return BUILDERS[suffix]


def _first_bad_json_line(path: Path, text_field: str) -> tuple[int, str] | None:
    """Line number (1-based) and problem, with its fix, of the first line of a JSON-lines file that is not
    UTF-8, not JSON, not an object, or whose `text_field` is missing or not a string. Read as bytes, so
    that a line that is not UTF-8 has its number too."""
    try:
        if _strip_compression(path).suffix == ".json" and _starts_with_bracket(path):
            return None  # one JSON document, not JSON lines: no line to point at
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                problem = _json_line_problem(raw, text_field)
                if problem:
                    return line_no, problem
    except (OSError, EOFError, ImportError, ValueError):  # unreadable archive: the caller's message says so
        return None
    return None


def _json_line_problem(raw: bytes, text_field: str) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}). "
            "Save the file as UTF-8, or fix or remove that line."
        )
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg}). Fix or remove that line."
    example = json.dumps({text_field: "..."})
    if not isinstance(record, dict):
        return (
            f"{_json_kind(record)}, not an object. Each line must be one JSON object holding the text "
            f"under `data.text_field` {text_field!r}, e.g. {example}."
        )
    if text_field not in record:
        fields = ", ".join(record) or "none"
        return (
            f"no field {text_field!r} (`data.text_field`; this line's fields: {fields}). "
            f"Add the text as {example}, or remove that line."
        )
    value = record[text_field]
    if not isinstance(value, str):
        shown = "" if value is None else f" ({_shorten(json.dumps(value), 40)})"
        return (
            f"field {text_field!r} (`data.text_field`) is {_json_kind(value)}{shown}, not a string. Make it "
            f"a string, e.g. {example}, or set `data.text_field` to the field that holds the text."
        )
    return None


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _starts_with_bracket(path: Path) -> bool:
    with _open_binary(path) as fh:
        return fh.read(4096).lstrip().startswith(b"[")


def _open_binary(path: Path) -> BinaryIO:
    """A compressed file as its uncompressed bytes, like `datasets` reads it."""
    import bz2
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    if path.suffix == ".zst":
        import zstandard  # an ImportError where it is missing: then no line is pointed at

        return zstandard.open(path, "rb")
    return openers.get(path.suffix, open)(path, "rb")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else type(value).__name__

"""Loading a fast tokenizer from any of the places users keep one, and naming it exactly.

A tokenizer's identity is its spec plus a hash of its vocabulary; later stages compare that hash to make
sure a teacher reads the same token ids that `prepare` wrote.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import InputError, first_line

# Separators tried, in order, when `data.eos_token` is empty: the document separator that GPT-2 and
# SmolLM-family models were pretrained with comes before a chat model's end-of-turn EOS.
DOCUMENT_SEPARATORS = ("<|endoftext|>",)


def tokenizer_files(spec: str) -> list[Path]:
    """The local files that define the tokenizer (their hashes go into the fingerprint); [] for hub ids."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and _is_tokenizer_file(p))
    return []


def _is_tokenizer_file(path: Path) -> bool:
    return path.suffix in (".json", ".txt", ".model", ".bpe", ".gguf") and not path.name.startswith(".")


@dataclass(frozen=True)
class Tokenizer:
    """A loaded fast tokenizer: the Rust `tokenizers.Tokenizer` that does the work, and what names it."""

    spec: str
    backend: Any  # tokenizers.Tokenizer
    eos_token: str | None
    name_or_path: str

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)


def load_tokenizer(spec: str, setting: str = "data.tokenizer") -> Tokenizer:
    """A fast tokenizer from a hub id, a local folder, a `tokenizer.json` file or a `.gguf` file.

    A bare `tokenizer.json` is read by `tokenizers` alone: importing transformers would cost seconds.
    """
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "/", "~")) or path.suffix in (".json", ".gguf")):
        raise InputError(f"Tokenizer `{spec}` does not exist. Set `{setting}` to an existing file or folder.")
    if path.is_dir() and not (path / "tokenizer_config.json").exists() and (path / "tokenizer.json").exists():
        path = path / "tokenizer.json"
    try:
        if path.is_file() and path.suffix != ".gguf":
            from tokenizers import Tokenizer as RustTokenizer

            return Tokenizer(spec, RustTokenizer.from_file(str(path)), None, str(path))
        from transformers import AutoTokenizer

        if path.is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # tokenizers and transformers raise many types for "cannot load"
        raise InputError(
            f"Cannot load tokenizer `{spec}` ({first_line(exc)}). Set `{setting}` to a hub id, a local "
            "folder, a tokenizer.json or a .gguf file."
        ) from None
    if not tokenizer.is_fast:
        raise InputError(f"Tokenizer `{spec}` has no fast (Rust) implementation; cocomix needs one.")
    return Tokenizer(spec, tokenizer.backend_tokenizer, tokenizer.eos_token, tokenizer.name_or_path)


def vocab_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the token -> id mapping, added tokens included."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def document_separator(tokenizer: Tokenizer, eos_token: str) -> tuple[str, int]:
    """The token and id that join documents: `eos_token` if set, else a known separator, else the EOS."""
    vocab = tokenizer.get_vocab()
    if eos_token:
        if eos_token not in vocab:
            raise InputError(
                f"`data.eos_token` {eos_token!r} is not in the vocabulary of tokenizer `{tokenizer.spec}`."
            )
        return eos_token, vocab[eos_token]
    for candidate in DOCUMENT_SEPARATORS:
        if candidate in vocab:
            return candidate, vocab[candidate]
    if tokenizer.eos_token and tokenizer.eos_token in vocab:
        return tokenizer.eos_token, vocab[tokenizer.eos_token]
    raise InputError(
        f"Tokenizer `{tokenizer.spec}` has no EOS token. Set `data.eos_token` to the document separator."
    )

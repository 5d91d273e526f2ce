"""Shared test builders: paths to the real data in ../shared, tiny corpora written by the test, and a
CLI runner that runs `cocomix` in-process the way a user's shell would."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IMDB = SHARED_DATA / "corpus" / "imdb" / "aclImdb_v1_reviews.jsonl.gz"
GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2" / "tokenizer.json"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (it lives in ../shared beside the project)")
    return path


@pytest.fixture
def imdb_path() -> Path:
    return _require(IMDB)


@pytest.fixture
def gpt2_tokenizer() -> Path:
    return _require(GPT2_TOKENIZER)


def read_imdb_texts(n: int) -> list[str]:
    """The first `n` IMDb review texts, read without `datasets` (an independent reference)."""
    texts = []
    with gzip.open(_require(IMDB), "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(texts) == n:
                break
            texts.append(json.loads(line)["text"])
    return texts


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


class Cocomix:
    """Runs `cocomix ARGS` in-process from a working directory, like a shell would."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.runner = CliRunner()

    def __call__(self, *args: str) -> CliResult:
        from cocomix_cli.app import app

        previous = Path.cwd()
        os.chdir(self.cwd)
        try:
            result = self.runner.invoke(app, ["--no-progress", *args], catch_exceptions=False)
        finally:
            os.chdir(previous)
        return CliResult(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cocomix(tmp_path: Path) -> Cocomix:
    return Cocomix(tmp_path)


def cocomix_subprocess(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    """`cocomix` as a separate process (for kills and locks that need a real second process)."""
    return subprocess.Popen([sys.executable, "-m", "cocomix_cli", "--no-progress", *args], cwd=cwd, **kwargs)


SMOLLM2_GGUF = REPO.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def smollm2_gguf() -> Path:
    return _require(SMOLLM2_GGUF)


def tiny_model_config(**overrides):
    """A model small enough for exhaustive CPU tests; every variant-specific field is set."""
    from pipelines.model import ModelConfig

    values = dict(
        vocab_size=97,
        context_length=64,
        n_layer=4,
        n_head=2,
        n_embd=32,
        insert_layer=2,
        n_concepts=64,
        concept_k=8,
    )
    values.update(overrides)
    return ModelConfig(**values)

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


def tiny_teacher(folder: Path, n_layer: int = 3, n_embd: int = 32, seed: int = 0) -> Path:
    """A random GPT-2 with the real GPT-2 tokenizer, saved like a hub checkpoint (safetensors + tokenizer)."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=128, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(folder)
    shutil.copy(_require(GPT2_TOKENIZER), folder / "tokenizer.json")
    return folder


def tiny_sae(d_in: int = 32, d_sae: int = 128, k: int = 8, seed: int = 0):
    """A random TopK SAE with every parameter non-zero, so no term of the math hides."""
    import torch

    from pipelines.sae import TopKSAE

    torch.manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k, normalize="layer_norm")
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0.0, 0.3)
    return sae


def prepared_run(directory: Path, documents: int = 60, block_size: int = 32, **data) -> Path:
    """A run folder whose `prepare` stage is done on the first IMDb reviews, with a config file beside it."""
    from pipelines import prepare
    from pipelines.config import load_config

    config = directory / "cocomix.toml"
    values = {
        "source": str(_require(IMDB)),
        "tokenizer": str(_require(GPT2_TOKENIZER)),
        "block_size": block_size,
        "max_documents": documents,
        "val_fraction": 0.2,
        **data,
    }
    lines = ["[run]", 'dir = "run"', "[data]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    config.write_text("\n".join(lines) + "\n")
    previous = Path.cwd()
    os.chdir(directory)
    try:
        prepare.run(load_config(config), progress=False)
    finally:
        os.chdir(previous)
    return config


def run_in(directory: Path, stage, args: list[str], **kwargs):
    """`stage(config)` run from `directory` with its cocomix.toml and `--set` style `args`, no progress."""
    from pipelines.config import load_config

    previous = Path.cwd()
    os.chdir(directory)
    try:
        return stage(load_config(directory / "cocomix.toml", args), progress=False, **kwargs)
    finally:
        os.chdir(previous)

"""Shared test builders and where test data comes from.

Every unmarked test runs from a bare clone: it reads the fixtures committed under `tests/data/` (two
public-domain plays and small files in every benchmark layout, see tests/data/README.md) and what it builds
itself: a byte-level BPE tokenizer trained once per test run on those plays, tiny GPT-2 and Llama teachers
on it, and SAEs. Tests that need the developers' real data or the real SmolLM2 teacher carry the
`real_data` marker; they read the folder named by `$COCOMIX_TEST_SHARED` (default `../shared` beside the
project) and skip, with one reason line, where it is absent. `.ci/run` runs the unmarked tests with that
setting pointed at a missing folder, so a test that reads it unmarked fails there.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

# Bitwise comparisons between in-process runs, subprocesses and torchrun workers (which torchrun starts
# with one thread each unless OMP_NUM_THREADS is set) need one thread count everywhere: float reductions
# split over threads round differently. Set before torch is imported by any test module.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
FIXTURE_EVAL = TEST_DATA / "eval"
FIXTURE_PLAYS = sorted((TEST_DATA / "corpus").glob("*.txt"))

SHARED = Path(os.environ.get("COCOMIX_TEST_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
IMDB = SHARED_DATA / "corpus" / "imdb" / "aclImdb_v1_reviews.jsonl.gz"
GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2" / "tokenizer.json"
SHARED_EVAL = SHARED_DATA / "eval"
SMOLLM2_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SEPARATOR = "<|endoftext|>"
VOCAB_SIZE = 1024
PARAGRAPHS_PER_DOCUMENT = 8


# --- markers: real data is optional, skips are visible --------------------------------------------------


def pytest_collection_modifyitems(config, items):
    if SHARED.is_dir():
        return
    reason = f"needs the shared data folder {SHARED} (real data and the SmolLM2 teacher; developers only)"
    for item in items:
        if item.get_closest_marker("real_data") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _SKIPPED.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import, e.g. by `pytest.importorskip`
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    # CI promises that nothing but GPU tests is skipped: there, a skip is a test that did not run.
    if os.environ.get("COCOMIX_TEST_NO_SKIP") == "1" and _SKIPPED and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("COCOMIX_TEST_NO_SKIP") == "1" and _SKIPPED:
        terminalreporter.write_line(
            f"COCOMIX_TEST_NO_SKIP=1, but {len(_SKIPPED)} test(s) were skipped: {', '.join(_SKIPPED[:10])}",
            red=True,
        )


def _real(request, path: Path) -> Path:
    """A file of the shared folder, for a test marked `real_data` (the marker's skip runs first)."""
    if request.node.get_closest_marker("real_data") is None:
        pytest.fail(f"{request.node.nodeid} reads {path} but is not marked `real_data`")
    if not path.exists():
        pytest.fail(f"{path} is missing from the shared folder {SHARED}")
    return path


@pytest.fixture
def imdb_path(request) -> Path:
    return _real(request, IMDB)


@pytest.fixture
def gpt2_tokenizer(request) -> Path:
    return _real(request, GPT2_TOKENIZER)


@pytest.fixture
def smollm2_gguf(request) -> Path:
    return _real(request, SMOLLM2_GGUF)


@pytest.fixture
def shared_eval(request) -> Path:
    return _real(request, SHARED_EVAL)


def read_imdb_texts(n: int) -> list[str]:
    """The first `n` IMDb review texts, read without `datasets` (an independent reference)."""
    texts = []
    with gzip.open(IMDB, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(texts) == n:
                break
            texts.append(json.loads(line)["text"])
    return texts


# --- the committed corpus and the tokenizer trained on it -----------------------------------------------


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    paragraphs = []
    for play in FIXTURE_PLAYS:
        paragraphs += [p.strip() for p in re.split(r"\n\s*\n", play.read_text(encoding="utf-8")) if p.strip()]
    return tuple(paragraphs)


def corpus_documents(n: int | None = None) -> list[str]:
    """The first `n` documents of the committed plays: runs of 8 paragraphs (speeches), IMDb-review sized."""
    paragraphs = _paragraphs()
    documents = [
        "\n\n".join(paragraphs[i : i + PARAGRAPHS_PER_DOCUMENT])
        for i in range(0, len(paragraphs), PARAGRAPHS_PER_DOCUMENT)
    ]
    if n is not None and n > len(documents):
        raise ValueError(f"the committed corpus has {len(documents)} documents, not {n}")
    return documents[:n]


def corpus_jsonl(path: Path, n: int | None = None, copies: int = 1) -> Path:
    """`{"text": ...}` lines of the first `n` documents; `copies` > 1 repeats them, each copy numbered."""
    documents = corpus_documents(n)
    rows = [{"text": d if c == 0 else f"{c}. {d}"} for c in range(copies) for d in documents]
    return write_jsonl(path, rows)


@dataclass(frozen=True)
class TokenizerFiles:
    json: Path
    """A bare `tokenizer.json`, read by `tokenizers` alone."""
    folder: Path
    """The same tokenizer as a transformers folder (`tokenizer.json` + `tokenizer_config.json`)."""
    vocab_size: int
    separator_id: int


@functools.cache
def bpe_tokenizer() -> TokenizerFiles:
    """A byte-level BPE with `<|endoftext|>`, trained on the committed plays, once per test process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(tempfile.mkdtemp(prefix="cocomix-test-tokenizer-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(p) for p in FIXTURE_PLAYS], trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    folder = root / "folder"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=SEPARATOR, bos_token=SEPARATOR, unk_token=SEPARATOR
    ).save_pretrained(folder)
    return TokenizerFiles(
        root / "tokenizer.json", folder, tokenizer.get_vocab_size(), tokenizer.token_to_id(SEPARATOR)
    )


@pytest.fixture
def tokenizer_path() -> Path:
    return bpe_tokenizer().json


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- running the CLI ------------------------------------------------------------------------------------


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


# --- models ---------------------------------------------------------------------------------------------


class ReadBacks:
    """Records each call by cocomix's own code (`pipelines/`) that reads a tensor's value back to the host
    (on a GPU, a wait for every kernel queued before it), and the calls of `trainer_class._train_step`
    between them: which steps of a training loop read values back."""

    def __init__(self, monkeypatch, trainer_class):
        import torch

        self.events: list[str] = []
        train_step = trainer_class._train_step
        recorder = self

        def marked(trainer, *args):
            recorder.events.append("step")
            return train_step(trainer, *args)

        monkeypatch.setattr(trainer_class, "_train_step", marked)
        reads = {
            torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
            torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
        }  # fmt: skip
        prefix = str(REPO / "pipelines")

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                caller = sys._getframe(1).f_code.co_filename
                if func in reads and caller.startswith(prefix):
                    recorder.events.append(f"{Path(caller).name}:{func.__name__}")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self) -> ReadBacks:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.mode.__exit__(*exc_info)

    @property
    def steps(self) -> int:
        return self.events.count("step")

    def after_step(self) -> dict[int, list[str]]:
        """The read-backs after each step (0: before the first), for the steps that have any."""
        found: dict[int, list[str]] = {}
        step = 0
        for event in self.events:
            if event == "step":
                step += 1
            else:
                found.setdefault(step, []).append(event)
        return found


def tiny_model_config(**overrides):
    """A model small enough for exhaustive CPU tests; every variant-specific field is set."""
    from pipelines.model.gpt import ModelConfig

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


def tiny_teacher(
    folder: Path, n_layer: int = 3, n_embd: int = 32, seed: int = 0, architecture: str = "gpt2"
) -> Path:
    """A random GPT-2 or Llama on the test tokenizer, saved like a hub checkpoint (weights + tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer()
    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=2,
            n_positions=128,
            vocab_size=tokenizer.vocab_size,
            bos_token_id=tokenizer.separator_id,  # GPT2Config's 50256 is outside this vocabulary
            eos_token_id=tokenizer.separator_id,
        )
        model = GPT2LMHeadModel(config)
    elif architecture == "llama":
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=n_embd,
            intermediate_size=2 * n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            bos_token_id=tokenizer.separator_id,
            eos_token_id=tokenizer.separator_id,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(architecture)
    model.save_pretrained(folder)
    for file in tokenizer.folder.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def tiny_sae(d_in: int = 32, d_sae: int = 128, k: int = 8, seed: int = 0):
    """A random TopK SAE with every parameter non-zero, so no term of the math hides."""
    import torch

    from pipelines.sae.topk_sae import TopKSAE

    torch.manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k, normalize="layer_norm")
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0.0, 0.3)
    return sae


# --- run folders ----------------------------------------------------------------------------------------


def write_run_config(directory: Path, **data) -> Path:
    """`directory/cocomix.toml` with `run.dir = "run"` and these `[data]` keys."""
    lines = ["[run]", 'dir = "run"', "[data]"] + [f"{k} = {json.dumps(v)}" for k, v in data.items()]
    config = directory / "cocomix.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def prepared_run(directory: Path, documents: int = 60, block_size: int = 32, **data) -> Path:
    """A run folder whose `prepare` stage is done on the first documents of the committed corpus (or on
    `data.source` when given), with a config file beside it."""
    from pipelines.config.loading import load_config
    from pipelines.stages import prepare

    if "source" not in data:
        data["source"] = str(corpus_jsonl(directory / "corpus.jsonl", documents))
    values = {
        "tokenizer": str(bpe_tokenizer().json),
        "block_size": block_size,
        "max_documents": documents,
        "val_fraction": 0.2,
        **data,
    }
    config = write_run_config(directory, **values)
    previous = Path.cwd()
    os.chdir(directory)
    try:
        prepare.run(load_config(config), progress=False)
    finally:
        os.chdir(previous)
    return config


def run_in(directory: Path, stage, args: list[str], **kwargs):
    """`stage(config)` run from `directory` with its cocomix.toml and `--set` style `args`, no progress."""
    from pipelines.config.loading import load_config

    previous = Path.cwd()
    os.chdir(directory)
    try:
        return stage(load_config(directory / "cocomix.toml", args), progress=False, **kwargs)
    finally:
        os.chdir(previous)


def eval_results(cfg, **kwargs) -> dict:
    """What `eval` scored: the results its `StageResult` carries (and `eval/results.json` holds)."""
    from pipelines.stages import evaluate

    return evaluate.run(cfg, **kwargs).summary


# --- crash safety -----------------------------------------------------------------------------------------


def stage_status(cwd: Path, stage: str) -> str:
    """What `cocomix status --json` (run from `cwd`) says about `stage`."""
    states = json.loads(Cocomix(cwd)("status", "--json").stdout)["stages"]
    return next((s["status"] for s in states if s["stage"] == stage), "not listed")


def assert_kills_during_the_force_clear_rerun_to_the_same_result(
    cwd: Path, args: list[str], stage: str, result: Callable[[], Any], compare: Callable[[Any, Any], None]
) -> None:
    """`cocomix ARGS --force` SIGKILLed after each step of its clear (the manifest, then each output),
    each followed by the documented rerun, `cocomix ARGS`: `status` says `interrupted` (never `complete`)
    after the kill, and the rerun ends with the result and the fingerprint of the finished stage before."""
    stage_dir = cwd / "run" / stage
    manifest = stage_dir / "manifest.json"
    reference, fingerprint = result(), json.loads(manifest.read_text())["fingerprint"]
    outputs = sorted(p.name for p in stage_dir.iterdir() if not p.name.startswith((".", "manifest")))
    assert outputs, stage
    for instant in ["manifest.json", *outputs]:  # the clear marks the manifest, then removes each output
        env = {**os.environ, "COCOMIX_KILL_AT": f"clear:{stage}:{instant}"}
        killed = cocomix_subprocess([*args, "--force"], cwd=cwd, env=env)
        assert killed.wait(timeout=300) == -signal.SIGKILL, instant
        assert stage_status(cwd, stage) == "interrupted", instant
        rerun = subprocess.run(
            [sys.executable, "-m", "cocomix_cli", "--no-progress", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        assert rerun.returncode == 0 and "up to date" not in rerun.stdout, (instant, rerun.stderr[-2000:])
        assert stage_status(cwd, stage) == "complete", instant
        compare(result(), reference)
        assert json.loads(manifest.read_text())["fingerprint"] == fingerprint, instant


# --- memory -------------------------------------------------------------------------------------------


def peak_allocated_bytes(fn) -> int:
    """The most bytes that `fn` has allocated at once on the CPU beyond what was there before, by
    torch.profiler's memory records (an allocation is positive, a free negative)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        held += record.nbytes()
        peak = max(peak, held)
    return peak


# --- benchmarks -----------------------------------------------------------------------------------------


def load_benchmark(name: str):
    """`benchmarks/<name>.py` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

"""Every example command of README.md and docs/*.md, run as a user would copy it.

An example is a line of a ```` ```bash ```` block, or a `$ `-prefixed line of a console block, that starts
with `cocomix`, `torchrun` or `bash configs/` (a trailing `\\` joins the next line); printed output is not
a command. The examples are read from the docs when the tests are collected, so a new one is tested without
editing this file. Each runs through bash, in its own copy of one run folder built once per test run: a
quickstart at tiny sizes (`runs/quickstart`, NTP and CoCoMix with seeds 0 and 1, a random GPT-2 teacher on
the committed plays, a 2,048-latent SAE, and the docs' variant `cocomix_add` declared but not trained), with
the files the docs name (`data/...`, `configs/`, an SAE in SAELens' format) and the docs' placeholders mapped
to them (`PLACEHOLDERS`). The slurm examples submit to a local slurm (`tests/slurm_cluster.py`) whose jobs
are cancelled at once.

The hub is unreachable, as on most cluster compute nodes: `HF_HUB_OFFLINE=1` and an endpoint that refuses
connections, so nothing is ever pushed. An example passes when it exits 0, or exits 2 with one line on
stderr naming what a bare machine lacks (the hub, a GPU); never a traceback. `SKIPPED` lists, with their
reasons, the few examples that cannot run here at all.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import slurm_cluster
from tests.cli.test_bad_input import assert_one_line_error
from tests.conftest import (
    FIXTURE_EVAL,
    REPO,
    CliResult,
    bpe_tokenizer,
    corpus_jsonl,
    tiny_teacher,
)

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(cocomix|torchrun)(\s|$)|bash configs/")

# Placeholders of the docs, as regular expressions, and what each runs as here.
PLACEHOLDERS = [
    (r"--nproc_per_node \d+", "--nproc_per_node 2"),  # 2 gloo ranks on two CPU cores
    (r"\bruns/a/", "runs/quickstart/"),
    (r"saelens:RELEASE/SAE_ID", "sae-saelens"),  # an SAE in SAELens' own files, local
]

# At most five, each with its reason; matched against the start of the example's command. They are left
# out of the parametrised test, not skipped, since CI allows no skip; a test keeps the list to five.
SKIPPED = {
    "cocomix --config configs/study.toml run": "docs/STUDY.md's study: its stages' wall times sum to 94 "
    "minutes on two CPU cores, with its assets from PyPI",
    "torchrun --nproc_per_node 8 -m cocomix_cli --set pretrain.fsdp=true pretrain": "FSDP over the "
    "quickstart's finished students is another run (its optimizer state is keyed otherwise): refused in "
    "one line per rank, then torchrun exits 1 with its own report; tests/test_parallel.py trains FSDP",
}

# What a bare machine lacks, named by the one line of an exit 2.
LACKS = re.compile(r"hub|offline|CUDA|GPU|internet|network", re.I)
TIMEOUT_S = 600


@dataclass(frozen=True)
class Example:
    file: Path
    line: int
    command: str

    @property
    def id(self) -> str:
        return f"{self.file.name}:{self.line}"

    @property
    def bare(self) -> str:
        """The command without its trailing `# comment`."""
        return re.split(r"\s+# ", self.command, maxsplit=1)[0]


def examples_in(path: Path) -> list[Example]:
    """The example commands of one Markdown file, in order."""
    examples, fence, pending = [], None, None
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = text.strip()
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence is None:
            continue
        if pending is not None:
            pending = pending[:-1].rstrip() + " " + line
        elif fence == "bash":
            pending, start = line, number
        elif fence in ("", "console", "shell") and line.startswith("$ "):
            pending, start = line[2:], number
        else:
            continue
        if pending.endswith("\\"):
            continue
        if COMMAND.match(pending):
            examples.append(Example(path, start, pending))
        pending = None
    return examples


def all_examples() -> list[Example]:
    return [example for doc in DOCS for example in examples_in(doc)]


def as_run_here(command: str) -> str:
    for pattern, replacement in PLACEHOLDERS:
        command = re.sub(pattern, replacement, command)
    return command


def skip_reason(command: str) -> str | None:
    return next((reason for start, reason in SKIPPED.items() if command.startswith(start)), None)


def problem(outcome: CliResult) -> str | None:
    """What is wrong with an example's outcome, or None when it is what the docs promise."""
    said = outcome.stdout + outcome.stderr
    if "Traceback (most recent call last)" in said:
        return "a traceback"
    if outcome.exit_code == 0:
        return None
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if outcome.exit_code == 2:
        if not lines or not lines[-1].startswith("error: "):
            return "exit 2 without an `error: ` line at the end of stderr"
        if not LACKS.search(lines[-1]):
            return f"exit 2 for something other than what a bare machine lacks: {lines[-1]}"
        return None
    return f"exit {outcome.exit_code}"


# --- the run folder -----------------------------------------------------------------------------------------


def offline_env() -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: refused at once, should anything try
        "OMP_NUM_THREADS": "1",
    }


def write_quickstart(folder: Path) -> None:
    """The quickstart's `cocomix.toml` at tiny sizes, with the files and folders the docs' examples name."""
    teacher = tiny_teacher(folder / "teacher")
    corpus = corpus_jsonl(folder / "corpus.jsonl", 60)
    (folder / "data" / "heldout").mkdir(parents=True)
    with gzip.open(folder / "data" / "plays.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(corpus.read_text())
    corpus_jsonl(folder / "data" / "heldout" / "speeches.jsonl", 20)
    shutil.copy(FIXTURE_EVAL / "hellaswag" / "hellaswag_val.jsonl", folder / "data" / "hellaswag_val.jsonl")
    shutil.copytree(FIXTURE_EVAL / "piqa", folder / "data" / "piqa")
    shutil.copytree(REPO / "configs", folder / "configs")
    from tests.test_sae_formats import D_IN, random_weights, write_saelens

    assert D_IN == 32  # the tiny teacher's width
    write_saelens(folder / "sae-saelens", random_weights(0), "standard")
    (folder / "cocomix.toml").write_text(
        f"""
[run]
dir = "runs/quickstart"
seed = 0
objectives = ["ntp", "cocomix"]
seeds = [0, 1]
[data]
source = "{corpus}"
tokenizer = "{bpe_tokenizer().json}"
block_size = 32
val_fraction = 0.2
[teacher]
model = "{teacher}"
layer = 1
[sae]
latents = 2048
k = 8
train_tokens = 2048
batch_tokens = 256
buffer_tokens = 1024
dead_after_tokens = 1024
eval_every_tokens = 1024
eval_tokens = 256
checkpoint_every_tokens = 1024
[extract]
blocks_per_chunk = 8
tokens_per_batch = 256
store_sae_topk = true
[pretrain]
preset = "tiny"
n_layer = 2
n_head = 2
n_embd = 32
insert_layer = 1
concept_k = 8
global_batch_blocks = 4
max_steps = 8
warmup_steps = 2
lr = 3e-3
eval_every = 4
save_every = 4
log_every = 2
[eval]
tasks = ["ppl", "lambada_openai", "hellaswag", "piqa", "social_iqa", "arc_easy", "winogrande"]
missing_data = "hub_or_skip"
limit = 8
[run.variants.cocomix_add]  # the docs' `--variant cocomix_add`, declared but not trained by `run`
objective = "cocomix"
"pretrain.mixing" = "add"
[steer]
demo_prompts = ["KING. My lords, the"]
demo_scales = [-10.0, 10.0]
max_new_tokens = 6
"""
    )


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> Path:
    """A finished tiny quickstart, built once: `cocomix run` and `cocomix concepts build`.

    In a process of its own, as the examples run: the hub libraries read `HF_HUB_OFFLINE` when they are
    imported, so in this process, where an earlier test may have imported them online, each benchmark
    the hub cannot give would cost their retries (about 24 s) instead of failing at once."""
    folder = tmp_path_factory.mktemp("quickstart")
    write_quickstart(folder)
    result = run_in(folder, "cocomix --no-progress run && cocomix --no-progress concepts build")
    assert result.exit_code == 0, result.stderr
    return folder


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    with slurm_cluster.running(tmp_path_factory.mktemp("examples-slurm")) as cluster:
        yield cluster


def run_example(
    command: str, quickstart: Path, folder: Path, extra_env: dict[str, str] | None = None
) -> CliResult:
    """`command` through bash in a fresh copy of the quickstart folder."""
    shutil.copytree(quickstart, folder, symlinks=True, ignore=shutil.ignore_patterns(".lock*"))
    return run_in(folder, command, extra_env)


def run_in(folder: Path, command: str, extra_env: dict[str, str] | None = None) -> CliResult:
    """`command` through bash in `folder`, as on a bare machine with this environment's `cocomix`."""
    bin_dir = str(Path(sys.executable).parent)  # cocomix and torchrun of this environment
    env = {**os.environ, **offline_env(), **(extra_env or {}), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    # No token of the developer's, nor a cache of theirs: a bare machine, where `--push-to-hub` stops first.
    env["HF_HOME"] = str(folder.parent / "hf-home")
    for name in ("COCOMIX_CONFIG", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    result = subprocess.run(
        ["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    return CliResult(result.returncode, result.stdout, result.stderr)


def slurm_env(cluster, folder: Path) -> dict[str, str]:
    """The cluster's `SLURM_CONF` and CPU-node site settings for `configs/slurm/submit.sh`."""
    return {
        "SLURM_CONF": cluster.env["SLURM_CONF"],
        "COCOMIX_ENV": str(Path(sys.executable).parent / "activate"),
        "COCOMIX_GPUS_PER_NODE": "0",
        "COCOMIX_RANKS_PER_NODE": "2",
        "COCOMIX_CPUS_PER_RANK": "1",
        "COCOMIX_MEM": "0",
        "COCOMIX_TIME": "5:00",
    }


# --- the tests ----------------------------------------------------------------------------------------------


def example_params() -> list:
    """Every example but those of `SKIPPED` (left out rather than skipped: CI allows no skip), those that
    submit to slurm marked `slurm` (they start a local one)."""
    return [
        pytest.param(
            e, id=e.id, marks=[pytest.mark.slurm] if e.command.startswith("bash configs/slurm/") else []
        )
        for e in all_examples()
        if skip_reason(e.command) is None
    ]


@pytest.mark.slow
@pytest.mark.parametrize("example", example_params())
def test_example_runs_as_the_docs_say(example: Example, quickstart, request, tmp_path, record_property):
    command = as_run_here(example.command)
    extra_env = None
    if command.startswith("bash configs/slurm/"):
        cluster = request.getfixturevalue("slurm")
        extra_env = slurm_env(cluster, tmp_path / "run")
    try:
        outcome = run_example(command, quickstart, tmp_path / "run", extra_env)
    finally:
        if extra_env is not None:  # nothing a paper-scale chain submitted here may run
            cluster.run("scancel", "--full", "--user=root", check=False)
            cluster.wait_until_idle(120)
    record_property("exit_code", outcome.exit_code)  # the tally by exit code: --junitxml
    if extra_env is not None and outcome.exit_code == 0:  # it submitted the plan's jobs, one line each
        assert re.search(r"^\d+ prepare$", outcome.stdout, re.M), outcome.stdout + outcome.stderr
    found = problem(outcome)
    assert found is None, (
        f"{example.id}: `{command}`: {found}\n--- stdout\n{outcome.stdout[-3000:]}\n"
        f"--- stderr\n{outcome.stderr[-3000:]}"
    )


def test_the_docs_hold_examples_and_few_are_skipped():
    examples = all_examples()
    commands = {e.command for e in examples}
    assert len(examples) >= 70
    assert "cocomix eval --tasks hellaswag,piqa" in {e.bare for e in examples}
    assert len(SKIPPED) <= 5
    for start in SKIPPED:  # a skip whose example is gone is a stale entry
        assert any(c.startswith(start) for c in commands), start


def test_parsing_takes_commands_and_leaves_output(tmp_path):
    doc = tmp_path / "DOC.md"
    doc.write_text(
        "```bash\ncocomix run   # a comment\ncocomix eval \\\n  --tasks ppl\npython -m pytest\n```\n"
        "```\n$ cocomix status\ncocomix printed this\n```\n"
        "```toml\ncocomix = 1\n```\n"
        "```console\n$ torchrun --nproc_per_node 8 -m cocomix_cli pretrain\n```\n"
        "```bash\nbash configs/slurm/submit.sh cocomix.toml\ncocomixer --help\n```\n"
    )
    assert [(e.line, e.command) for e in examples_in(doc)] == [
        (2, "cocomix run   # a comment"),
        (3, "cocomix eval --tasks ppl"),
        (8, "cocomix status"),
        (15, "torchrun --nproc_per_node 8 -m cocomix_cli pretrain"),
        (18, "bash configs/slurm/submit.sh cocomix.toml"),
    ]


@pytest.mark.slow
def test_an_example_with_a_bad_flag_fails_the_examples_test(quickstart, tmp_path):
    commands_md = tmp_path / "COMMANDS.md"
    text = (REPO / "docs" / "COMMANDS.md").read_text(encoding="utf-8")
    assert "cocomix status --verify" in text
    commands_md.write_text(text.replace("cocomix status --verify", "cocomix status --verfy", 1))
    [bad] = [e for e in examples_in(commands_md) if "--verfy" in e.command]
    outcome = run_example(as_run_here(bad.command), quickstart, tmp_path / "run")
    assert outcome.exit_code == 2
    assert problem(outcome) is not None and "--verfy" in outcome.stderr


# --- the headline commands, pinned ----------------------------------------------------------------------


def manifest(folder: Path, stage: str) -> bytes:
    return (folder / "runs" / "quickstart" / stage / "manifest.json").read_bytes()


def one_error_line(outcome: CliResult) -> str:
    assert_one_line_error(outcome)
    return outcome.stderr.strip()


@pytest.mark.slow
def test_eval_of_benchmarks_without_data_is_one_line_and_leaves_eval_as_it_was(quickstart, tmp_path):
    folder = tmp_path / "run"
    first = run_example("cocomix eval --tasks hellaswag,piqa", quickstart, folder)
    line = one_error_line(first)
    assert line.startswith("error: No eval task left to score (hellaswag") and "piqa: no local data" in line
    assert "--data TASK=PATH" in line and "eval.data_dir" in line
    assert manifest(folder, "eval") == manifest(quickstart, "eval")  # still complete, as before
    assert one_error_line(run_in(folder, "cocomix eval --tasks hellaswag,piqa")) == line


@pytest.mark.slow
def test_eval_groups_each_students_seeds_in_one_readable_column(quickstart, tmp_path):
    folder = tmp_path / "run"
    data = "--data hellaswag=data/hellaswag_val.jsonl --data piqa=data/piqa/valid.jsonl"
    command = f"COLUMNS=100 cocomix eval --tasks hellaswag,piqa {data}"
    outcome = run_example(
        f"{command} && cocomix eval --tasks hellaswag,piqa {data} --json", quickstart, folder
    )
    table, as_json = outcome.stdout.rsplit("\n{", 1)
    assert outcome.exit_code == 0, outcome.stderr
    assert max(len(line) for line in table.splitlines()) <= 100 and "…" not in table
    header = next(line for line in table.splitlines() if "task / metric" in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")] == ["task / metric", "cocomix", "ntp"]
    assert "│ seeds " in table and "hellaswag acc (n=8)" in table
    results = json.loads("{" + as_json)["results"]  # --json keeps every student and seed
    assert sorted(results) == [f"pretrain-{s}-seed{k}" for s in ("cocomix", "ntp") for k in (0, 1)]


@pytest.mark.slow
def test_pretrain_resume_in_a_seeded_run_is_its_first_seed_and_trains_nothing(quickstart, tmp_path):
    folder = tmp_path / "run"
    outcome = run_example("cocomix pretrain --resume && cocomix pretrain --objective ntp", quickstart, folder)
    assert outcome.exit_code == 0, outcome.stderr
    assert "pretrain-cocomix-seed0: up to date" in outcome.stdout
    assert "pretrain-ntp-seed0: up to date" in outcome.stdout
    students = sorted(p.name for p in (folder / "runs" / "quickstart").glob("pretrain-*"))
    assert students == [f"pretrain-{s}-seed{k}" for s in ("cocomix", "ntp") for k in (0, 1)]
    for stage in students:
        assert manifest(folder, stage) == manifest(quickstart, stage)


@pytest.mark.slow
def test_resume_without_a_checkpoint_says_so_before_it_starts(quickstart, tmp_path):
    folder = tmp_path / "run"
    outcome = run_example(
        "cocomix pretrain --objective ntp --seed 7 --max-steps 2 --resume", quickstart, folder
    )
    assert outcome.exit_code == 0, outcome.stderr
    [line] = [line for line in outcome.stderr.splitlines() if "--resume" in line]
    assert "pretrain-ntp-seed7 has no checkpoint to resume; starting from step 0" in line


@pytest.mark.slow
def test_lm_eval_with_the_hub_unreachable_is_one_line_and_leaves_eval_as_it_was(quickstart, tmp_path):
    command = "cocomix eval --backend lm-eval --tasks arc_challenge"
    unreachable = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    line = one_error_line(run_example(command, quickstart, tmp_path / "refused", unreachable))
    assert "loads arc_challenge from the HuggingFace hub, which is unreachable (127.0.0.1:9" in line
    assert manifest(tmp_path / "refused", "eval") == manifest(quickstart, "eval")
    # HF_HUB_OFFLINE=1, as clusters set it: lm-eval's own load fails, in one line too.
    line = one_error_line(run_example(command, quickstart, tmp_path / "offline"))
    assert "lm-eval could not load the data of task arc_challenge" in line
    assert manifest(tmp_path / "offline", "eval") == manifest(quickstart, "eval")
    status = run_in(tmp_path / "offline", "cocomix status --json")
    [state] = [s for s in json.loads(status.stdout)["stages"] if s["stage"] == "eval"]
    assert state["status"] == "complete"


@pytest.mark.slow
def test_log_samples_over_cached_scores_writes_the_samples(quickstart, tmp_path):
    folder = tmp_path / "run"
    data = "--tasks hellaswag --data hellaswag=data/hellaswag_val.jsonl"
    outcome = run_example(
        f"cocomix eval {data} --json > first.json && cocomix eval {data} --log-samples --json > second.json",
        quickstart,
        folder,
    )
    assert outcome.exit_code == 0, outcome.stderr
    first, second = (json.loads((folder / f"{n}.json").read_text()) for n in ("first", "second"))
    scores = [
        {
            label: {t: {k: v for k, v in m.items() if k != "seconds"} for t, m in r.items()}
            for label, r in run["results"].items()
        }
        for run in (first, second)
    ]
    assert scores[0] == scores[1]  # the same scores, computed again for their samples
    samples = sorted((folder / "runs" / "quickstart" / "eval" / "samples").glob("*/hellaswag.jsonl"))
    assert [p.parent.name for p in samples] == sorted(first["results"])
    assert all(len(p.read_text().splitlines()) == 8 for p in samples)  # eval.limit examples each


def test_a_student_named_without_its_seed_is_the_runs_first_seed(tmp_path):
    from pipelines.core.layout import seeded_student

    run = tmp_path / "run"
    for name in ("pretrain-cocomix-seed3", "pretrain-cocomix-seed1", "pretrain-cocomix-online-seed0"):
        (run / name / "model").mkdir(parents=True)
    assert seeded_student(run / "pretrain-cocomix") == run / "pretrain-cocomix-seed1"
    assert (
        seeded_student(run / "pretrain-cocomix" / "model", [3, 1]) == run / "pretrain-cocomix-seed3" / "model"
    )
    assert seeded_student(run / "pretrain-ntp") == run / "pretrain-ntp"  # nothing of it: as given
    (run / "pretrain-cocomix").mkdir()
    assert seeded_student(run / "pretrain-cocomix") == run / "pretrain-cocomix"  # it exists: itself


def test_a_gpu_this_machine_lacks_is_one_line_naming_the_setting(monkeypatch):
    import torch

    from pipelines.core.devices import resolve_device
    from pipelines.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"`sae.device` is `cuda`, but PyTorch sees no CUDA GPU"):
        resolve_device("cuda", "sae.device")
    with pytest.raises(ConfigError, match=r"`eval.device` is `tpu:x`: choose auto, cpu, cuda or cuda:N"):
        resolve_device("tpu:x", "eval.device")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.slow
def test_run_whose_eval_has_no_task_left_stops_there_in_one_line(quickstart, tmp_path):
    folder = tmp_path / "run"
    outcome = run_example("cocomix --set 'eval.tasks=[\"piqa\"]' run", quickstart, folder)
    assert "No eval task left to score (piqa: no local data" in one_error_line(outcome).replace("error: ", "")
    for stage in ("eval", "steer", "pretrain-cocomix-seed1"):  # nothing after it ran, nothing before changed
        assert manifest(folder, stage) == manifest(quickstart, stage)

"""`cocomix run`: the whole chain on a tiny config, its no-op rerun, its plan, and SIGKILL at every stage."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from pipelines.core.plot import HEIGHT_PX, WIDTH_PX
from pipelines.stages.report import without_wall_times
from tests.conftest import FIXTURE_EVAL, REPO, Cocomix, bpe_tokenizer, corpus_jsonl, tiny_teacher

STAGES = [
    "prepare",
    "train-sae",
    "extract-concepts",
    "pretrain-ntp",
    "pretrain-cocomix",
    "eval",
    "steer",
    "report",
]


def write_tiny_pipeline(directory: Path, teacher: Path) -> Path:
    """A config that runs every stage in seconds: random GPT-2 teacher, 128-latent SAE, 2-layer students."""
    eval_dir = directory / "eval-data"
    (eval_dir / "piqa").mkdir(parents=True)
    for name in ("valid.jsonl", "valid-labels.lst"):  # piqa is local, hellaswag is not: it is skipped
        shutil.copy(FIXTURE_EVAL / "piqa" / name, eval_dir / "piqa" / name)
    corpus = corpus_jsonl(directory / "corpus.jsonl", 60)
    config = directory / "cocomix.toml"
    config.write_text(
        f"""
[run]
dir = "run"
objectives = ["ntp", "cocomix"]
[data]
source = "{corpus}"
tokenizer = "{bpe_tokenizer().json}"
block_size = 32
max_documents = 60
val_fraction = 0.2
[teacher]
model = "{teacher}"
layer = 1
[sae]
latents = 128
k = 8
train_tokens = 2048
batch_tokens = 256
buffer_tokens = 1024
dead_after_tokens = 1024
eval_every_tokens = 1024
eval_tokens = 256
checkpoint_every_tokens = 512
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
batch_blocks = 4
max_steps = 12
warmup_steps = 2
lr = 3e-3
eval_every = 4
save_every = 4
log_every = 2
[eval]
tasks = ["ppl", "piqa", "hellaswag"]
data_dir = "{eval_dir}"
missing_data = "skip"
limit = 8
[steer]
demo_prompts = ["My lord, the"]
demo_scales = [-10.0, 10.0]
max_new_tokens = 6
"""
    )
    return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "gpt2")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher) -> tuple[Path, str]:
    """One uninterrupted `cocomix run` of the tiny pipeline, shared by the tests that only read it."""
    directory = tmp_path_factory.mktemp("finished")
    write_tiny_pipeline(directory, teacher)
    result = Cocomix(directory)("run")
    assert result.exit_code == 0, result.stderr
    return directory, result.stdout


def content_hashes(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock")
    }


def test_run_chains_every_stage_and_reports_both_students(finished_run):
    directory, stdout = finished_run
    run_dir = directory / "run"
    for index, stage in enumerate(STAGES, start=1):
        assert f"[{index}/{len(STAGES)}] {stage}: run (" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    for objective in ("ntp", "cocomix"):
        trained = json.loads((run_dir / f"pretrain-{objective}" / "manifest.json").read_text())["summary"]
        row = summary["objectives"][objective]
        assert row["val_ppl"] == trained["val_ppl"] and row["tokens"] == 12 * 4 * 32
        evaluated = results[f"pretrain-{objective}"]
        assert row["tasks"]["ppl"]["perplexity"] == evaluated["ppl"]["perplexity"]
        assert row["tasks"]["piqa"]["acc"] == evaluated["piqa"]["acc"]
        assert evaluated["piqa"]["examples"] == 8
    assert summary["skipped_tasks"] == ["hellaswag"]
    assert summary["skipped_reasons"] == {"hellaswag": "no local data (eval.missing_data = skip)"}
    assert "skipped hellaswag: no local data (eval.missing_data = skip)" in stdout

    (demo,) = summary["steering"]
    assert [r["setting"] for r in demo["runs"]] == ["unsteered", "scale -10", "scale 10"]
    inspect = json.loads((run_dir / "steer" / "demo.json").read_text())["prompts"][0]["inspect"]
    assert demo["concept"] == inspect[-1]["concepts"][0]["id"]  # the top concept at the last prompt token
    assert (run_dir / "concepts" / "dictionary.json").exists()

    report = (run_dir / "report.md").read_text()
    assert "| | ntp | cocomix |" in report
    ntp, cocomix = summary["objectives"]["ntp"], summary["objectives"]["cocomix"]
    assert f"| val perplexity | {ntp['val_ppl']:,.2f} | {cocomix['val_ppl']:,.2f} |" in report
    assert f"| piqa acc | {ntp['tasks']['piqa']['acc']:.4f} ± " in report
    assert f"concept {demo['concept']}" in report
    assert imread(run_dir / "loss_curves.png").shape[:2] == (HEIGHT_PX, WIDTH_PX)
    assert "](loss_curves.png)" in report and "colour" not in report
    assert not [key for key in summary if "colour" in key]  # the chart has a legend instead
    assert "cocomix run run" in stdout and "val perplexity" in stdout  # the summary table


def test_hub_or_skip_leaves_out_a_benchmark_the_hub_cannot_give_and_says_why(
    finished_run, tmp_path, monkeypatch
):
    directory, _ = finished_run
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    result = Cocomix(tmp_path)("run", "--from", "eval", "--set", "eval.missing_data=hub_or_skip")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_tasks"] == ["hellaswag"]
    reason = summary["skipped_reasons"]["hellaswag"]
    assert reason.startswith("no local data and the hub is unreachable (127.0.0.1:9: ")
    assert f"skipped hellaswag: {reason}" in result.stdout
    assert f"Skipped hellaswag: {reason}." in (tmp_path / "run" / "report.md").read_text()
    for objective in ("ntp", "cocomix"):  # what could be scored still is
        assert sorted(summary["objectives"][objective]["tasks"]) == ["piqa", "ppl"]


def test_a_second_run_is_a_no_op(finished_run):
    directory, _ = finished_run
    before = content_hashes(directory / "run")
    result = Cocomix(directory)("run")
    assert result.exit_code == 0, result.stderr
    for stage in STAGES[:5] + ["steer"]:
        assert f"{stage}: skip (complete)" in result.stdout
    assert content_hashes(directory / "run") == before


def test_a_run_folder_copied_elsewhere_is_complete_there_and_an_identical_sae_retraining_changes_nothing(
    finished_run, tmp_path
):
    directory, _ = finished_run
    copy = tmp_path / "elsewhere"
    shutil.copytree(directory, copy, ignore=shutil.ignore_patterns(".lock*", ".reader-*"))
    cocomix = Cocomix(copy)
    before = content_hashes(copy / "run")
    plan = json.loads(cocomix("run", "--dry-run", "--json").stdout)["plan"]
    assert {row["action"] for row in plan if row["stage"] not in ("eval", "report")} == {"skip"}
    result = cocomix("run")
    assert result.exit_code == 0, result.stderr
    for stage in STAGES[:5] + ["steer"]:
        assert f"{stage}: skip (complete)" in result.stdout
    assert content_hashes(copy / "run") == before

    for setting, stage in (("data.block_size=16", "prepare"), ("sae.k=4", "train-sae")):
        single = cocomix("pretrain", "--objective", "cocomix", "--set", setting)  # a single stage too
        assert single.exit_code == 2 and len(single.stderr.strip().splitlines()) == 1, single.stderr
        key, value = setting.split("=")
        assert f"`{stage}` in run was made with {key} = " in single.stderr
        assert (
            f"but the config now has {key} = {value}. Rerun it with `cocomix {stage} --force`"
            in single.stderr
        )

    summary = json.loads((copy / "run" / "summary.json").read_text())
    sae_rows = [json.loads(row) for row in (copy / "run/train-sae/metrics.jsonl").read_text().splitlines()]
    retrained = cocomix("train-sae", "--force")  # the same settings: bit-identical weights
    assert retrained.exit_code == 0, retrained.stderr
    again = cocomix("run")
    assert again.exit_code == 0, again.stderr
    for stage in STAGES[:5] + ["steer"]:
        assert f"{stage}: skip (complete)" in again.stdout
    after = content_hashes(copy / "run")
    rewritten = sorted(name for name in before if after.get(name) != before[name])
    # train-sae's own record of the retraining (times, throughput) and the report built from it
    assert "train-sae/manifest.json" in rewritten
    assert set(rewritten) <= {
        "report.md",
        "report.html",
        "summary.json",
        "train-sae/manifest.json",
        "train-sae/metrics.jsonl",
    }
    assert without_wall_times(json.loads((copy / "run" / "summary.json").read_text())) == without_wall_times(
        summary
    )
    new_rows = [json.loads(row) for row in (copy / "run/train-sae/metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in new_rows] == [
        {k: v for k, v in row.items() if k != "tokens_per_s"} for row in sae_rows
    ]


def test_the_plan_shows_states_and_refuses_changed_settings(finished_run):
    directory, _ = finished_run
    cocomix = Cocomix(directory)
    plan = json.loads(cocomix("run", "--dry-run", "--json").stdout)["plan"]
    assert [row["stage"] for row in plan] == STAGES
    assert {row["action"] for row in plan if row["stage"] not in ("eval", "report")} == {"skip"}

    partial = json.loads(
        cocomix("run", "--dry-run", "--json", "--from", "pretrain", "--until", "eval").stdout
    )
    assert [row["stage"] for row in partial["plan"]] == ["pretrain-ntp", "pretrain-cocomix", "eval"]

    changed = json.loads(cocomix("run", "--dry-run", "--json", "--set", "pretrain.lr=0.001").stdout)["plan"]
    refused = [row for row in changed if row["action"] == "refuse"]
    assert [row["stage"] for row in refused] == ["pretrain-ntp", "pretrain-cocomix"]
    assert "pretrain.lr" in refused[0]["state"]
    result = cocomix("run", "--set", "pretrain.lr=0.001")
    assert result.exit_code == 2
    assert "run/pretrain-ntp is complete, but pretrain.lr changed" in result.stderr
    assert "cocomix pretrain --objective ntp --force" in result.stderr

    until = cocomix("run", "--until", "pretrain")
    assert until.exit_code == 0 and "[5/5] pretrain-cocomix: skip (complete)" in until.stdout
    assert "stopped after --until pretrain" in until.stdout and "val perplexity" not in until.stdout

    kd = cocomix("run", "--dry-run", "--set", 'run.objectives=["ntp", "kd"]')
    assert kd.exit_code == 2 and "`kd`, which needs the teacher's top-N log-probs" in kd.stderr
    unknown = cocomix("run", "--dry-run", "--set", 'run.objectives=["ntp", "ntp2"]')
    assert (
        unknown.exit_code == 2
        and "`run.objectives` names `ntp2`, which is neither an objective" in unknown.stderr
    )
    baseline = cocomix("run", "--dry-run", "--set", 'run.baselines=["ntp", "kdd"]')
    assert baseline.exit_code == 2
    assert '--set run.baselines=["ntp", "kdd"]: `run.baselines` names `kdd`, which is neither' in (
        baseline.stderr
    )

    bad = cocomix("run", "--from", "train")
    assert bad.exit_code == 2 and "--from 'train' is not a step; choose from prepare, train-sae" in bad.stderr
    backwards = cocomix("run", "--from", "eval", "--until", "prepare")
    assert backwards.exit_code == 2 and "--from eval comes after --until prepare" in backwards.stderr


@pytest.mark.slow
def test_sigkill_during_each_stage_then_rerun_gives_the_uninterrupted_summary(
    finished_run, teacher, tmp_path
):
    directory, _ = finished_run
    write_tiny_pipeline(tmp_path, teacher)
    rng = random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed_in = []
    for stage in STAGES[:-1]:  # the report is rebuilt from files each time; killing it proves nothing new
        proc = subprocess.Popen(
            [sys.executable, "-m", "cocomix_cli", "--no-progress", "run"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for line in proc.stdout:
            if f"] {stage}: " in line:
                # A random moment early in the stage (these tiny stages take about a second or more).
                try:
                    proc.wait(timeout=rng.uniform(0.0, 0.3))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, f"`cocomix run` finished before the kill in {stage}"
        killed_in.append(stage)
    assert killed_in == STAGES[:-1]
    final = subprocess.run(
        [sys.executable, "-m", "cocomix_cli", "--no-progress", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert final.returncode == 0, final.stderr
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    uninterrupted = json.loads((directory / "run" / "summary.json").read_text())
    assert without_wall_times(resumed) == without_wall_times(uninterrupted)


@pytest.mark.parametrize(
    "config", sorted(p.relative_to(REPO) for p in [REPO / "cocomix.toml", *(REPO / "configs").glob("*.toml")])
)
def test_dry_run_of_every_shipped_config_prints_a_valid_plan(config, tmp_path):
    result = Cocomix(REPO)(
        "--config", str(config), "run", "--dry-run", "--json", "--set", f"run.dir={tmp_path}/r"
    )
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    stages = [row["stage"] for row in plan]
    assert stages[0] == "prepare" and stages[-1] == "report"
    assert {row["action"] for row in plan} == {"run"}


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "configs" / "slurm").iterdir()))
def test_slurm_scripts_parse(script):
    """Their syntax, on any machine; tests/test_slurm.py runs them on a local slurm."""
    path = REPO / "configs" / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0

"""`configs/slurm/` against a real slurm (tests/slurm_cluster.py): the chain end to end, preemption and a
lost rank, each followed by submitting the chain again.

The project is tiny (a random 3-layer teacher, the committed plays, 2-layer students) and runs on CPU nodes
as docs/SCALING.md says to set them: `COCOMIX_GPUS_PER_NODE=0`, two gloo ranks per student, two extraction
shards. The chain's students are compared with a plain `cocomix run` of the same config (one process: the
documented two-rank tolerance), and the interrupted chains' students with the uninterrupted chain's
(the same two ranks: bitwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.stages.report import without_wall_times
from tests import slurm_cluster
from tests.conftest import REPO, bpe_tokenizer, corpus_jsonl, tiny_teacher

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SUBMIT = REPO / "configs" / "slurm" / "submit.sh"
UPSTREAM = ("prepare", "train-sae", "extract-concepts")
STUDENTS = ("pretrain-ntp", "pretrain-cocomix")
SITE = {  # CPU nodes, as docs/SCALING.md's site settings say
    "COCOMIX_GPUS_PER_NODE": "0",
    "COCOMIX_RANKS_PER_NODE": "2",
    "COCOMIX_CPUS_PER_RANK": "1",
    "COCOMIX_MEM": "0",
    "COCOMIX_TIME": "20:00",
}
STEPS, SAVE_EVERY = 120, 10


def write_project(directory: Path, assets: Path, objectives: tuple[str, ...] = ("ntp", "cocomix")) -> None:
    """A config in `directory` whose corpus and teacher are the files in `assets` (the same for every project,
    so that their stages are byte for byte the same)."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus, teacher = assets / "corpus.jsonl", assets / "teacher"
    config = f"""
[run]
dir = "run"
objectives = {json.dumps(list(objectives))}
[data]
source = "{corpus}"
tokenizer = "{bpe_tokenizer().json}"
block_size = 32
max_documents = 200
val_fraction = 0.2
[teacher]
model = "{teacher}"
layer = 1
[sae]
latents = 64
k = 4
train_tokens = 2048
batch_tokens = 256
buffer_tokens = 1024
dead_after_tokens = 1024
eval_every_tokens = 1024
eval_tokens = 256
checkpoint_every_tokens = 1024
device = "cpu"
[extract]
tokens_per_batch = 256
blocks_per_chunk = 4
device = "cpu"
[pretrain]
preset = "tiny"
n_layer = 2
n_head = 2
n_embd = 64
insert_layer = 1
concept_k = 4
global_batch_blocks = 8
max_steps = {STEPS}
warmup_steps = 2
save_every = {SAVE_EVERY}
eval_every = 40
eval_blocks = 8
log_every = 10
device = "cpu"
[eval]
tasks = ["ppl"]
missing_data = "skip"
device = "cpu"
[steer]
demo_prompts = ["the"]
demo_scales = [-1.0, 1.0]
max_new_tokens = 4
"""
    (directory / "cocomix.toml").write_text(config)
    activate = Path(sys.executable).parent / "activate"
    (directory / "env.sh").write_text(f"source {activate}\n")


def submit(cluster: slurm_cluster.LocalSlurm, directory: Path) -> dict[str, str]:
    """`bash configs/slurm/submit.sh cocomix.toml 2 1` in `directory`: {stage: job id}."""
    env = {**cluster.env, **SITE, "COCOMIX_ENV": str(directory / "env.sh")}
    result = subprocess.run(
        ["bash", str(SUBMIT), "cocomix.toml", "2", "1"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return {stage: job for job, stage in (line.split() for line in result.stdout.splitlines())}


def weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / stage / "model" / "model.safetensors")


def status(run_dir: Path, stage: str) -> str | None:
    manifest = run_dir / stage / "manifest.json"
    return json.loads(manifest.read_text())["status"] if manifest.exists() else None


def latest_checkpoint_step(run_dir: Path, stage: str) -> int:
    steps = [
        int(m.group(1)) for p in (run_dir / stage).glob("checkpoints/*") if (m := re.search(r"(\d+)", p.name))
    ]
    return max(steps, default=0)


def wait_for_checkpoint(run_dir: Path, stage: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while latest_checkpoint_step(run_dir, stage) < step:
        assert status(run_dir, stage) != "complete", f"{stage} finished before it could be interrupted"
        assert time.monotonic() < deadline, f"{stage} never saved step {step}"
        time.sleep(0.05)


def copy_upstream(source: Path, directory: Path) -> None:
    for stage in UPSTREAM:
        shutil.copytree(
            source / "run" / stage, directory / "run" / stage, ignore=shutil.ignore_patterns(".lock*")
        )
    shutil.copy(source / "run" / "run.json", directory / "run" / "run.json")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster.running(tmp_path_factory.mktemp("slurm")) as started:
        yield started


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("assets")
    corpus_jsonl(folder / "corpus.jsonl", 200)
    tiny_teacher(folder / "teacher")
    return folder


@pytest.fixture(scope="module")
def chain(cluster, assets, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The whole chain, uninterrupted: {stage: job id}."""
    directory = tmp_path_factory.mktemp("chain")
    write_project(directory, assets)
    jobs = submit(cluster, directory)
    cluster.wait_until_idle()
    return directory, jobs


def test_the_chain_ends_as_a_plain_run_does(cluster, chain, assets, tmp_path):
    directory, jobs = chain
    assert list(jobs) == [*UPSTREAM, *STUDENTS, "report"]
    finished = cluster.finished()
    for stage, job in jobs.items():
        mine = [f for f in finished.values() if f["JobId"] == job or f.get("ArrayJobId") == job]
        assert mine, f"{stage}: job {job} is not in the completion record"
        assert {(f["JobState"], f["ExitCode"]) for f in mine} == {("COMPLETED", "0:0")}, (stage, mine)
    assert len([f for f in finished.values() if f["Name"] == "cocomix-extract"]) == 2  # the two shards

    plain = tmp_path / "plain"
    write_project(plain, assets)
    result = subprocess.run(
        [sys.executable, "-m", "cocomix_cli", "--no-progress", "run"],
        cwd=plain,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    slurm_run, plain_run = directory / "run", plain / "run"
    for stage in UPSTREAM:  # the same bytes, sharded or not, but for the paths a store's metadata names
        recorded = [
            json.loads((r / stage / "manifest.json").read_text())["outputs"] for r in (slurm_run, plain_run)
        ]
        for output in recorded[0]:
            if stage == "extract-concepts":  # its root attributes name the SAE file in each run's folder
                assert recorded[0][output].pop("zarr.json") != recorded[1][output].pop("zarr.json")
            assert recorded[0][output] == recorded[1][output] and len(recorded[0][output]) > 1, stage
    for (
        stage
    ) in STUDENTS:  # two ranks against one process: the documented tolerance of tests/test_pretrain.py
        ranked, single = weights(slurm_run, stage), weights(plain_run, stage)
        for name, tensor in ranked.items():
            torch.testing.assert_close(tensor, single[name], atol=1e-4, rtol=0, msg=f"{stage} {name}")
    summaries = [json.loads((r / "summary.json").read_text()) for r in (slurm_run, plain_run)]
    for name in ("ntp", "cocomix"):
        ranked, single = (s["objectives"][name] for s in summaries)
        assert ranked["tokens"] == single["tokens"] == STEPS * 8 * 32
        assert ranked["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)
    assert set(without_wall_times(summaries[0])) == set(without_wall_times(summaries[1]))


def training_student(cluster, reference: Path, assets: Path, directory: Path, name: str) -> dict[str, str]:
    """A project of one student beside the uninterrupted chain's finished upstream stages, submitted and
    trained past its second checkpoint: {stage: job id}."""
    write_project(directory, assets, objectives=(name,))
    copy_upstream(reference, directory)
    jobs = submit(cluster, directory)
    assert list(jobs) == [f"pretrain-{name}", "report"]  # the finished upstream stages get no job
    wait_for_checkpoint(directory / "run", f"pretrain-{name}", 2 * SAVE_EVERY)
    return jobs


def assert_resumed_to_the_uninterrupted_weights(run_dir: Path, reference: Path, stage: str) -> None:
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "resumed_at" in manifest  # continued, not started over
    resumed, uninterrupted = weights(run_dir, stage), weights(reference / "run", stage)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), f"{stage}: weights differ"


def test_a_student_stopped_by_sigterm_resumes_to_the_same_weights_when_the_chain_is_submitted_again(
    cluster, chain, assets, tmp_path
):
    """`scancel --signal=TERM`: the ranks save a checkpoint and the job ends; the chain submitted again
    skips the finished stages and resumes the student."""
    reference, _ = chain
    directory = tmp_path / "stopped"
    jobs = training_student(cluster, reference, assets, directory, "ntp")
    run_dir = directory / "run"
    cluster.run("scancel", "--signal=TERM", jobs["pretrain-ntp"])
    cluster.wait_until_idle()
    assert status(run_dir, "pretrain-ntp") == "running"  # stopped, resumable, not complete
    stopped_at = latest_checkpoint_step(run_dir, "pretrain-ntp")
    assert 2 * SAVE_EVERY <= stopped_at < STEPS
    log = (directory / "logs" / f"cocomix-pretrain-ntp-{jobs['pretrain-ntp']}.out").read_text()
    assert f"pretrain-ntp: stopped by SIGTERM after step {stopped_at}" in log, log[-2000:]
    finished = cluster.finished()
    assert finished[jobs["pretrain-ntp"]]["JobState"] == "FAILED"
    assert finished[jobs["report"]]["JobState"] == "CANCELLED"  # its dependency can never be met

    again = submit(cluster, directory)
    assert list(again) == ["pretrain-ntp", "report"]
    cluster.wait_until_idle()
    assert_resumed_to_the_uninterrupted_weights(run_dir, reference, "pretrain-ntp")
    summaries = [json.loads((r / "run" / "summary.json").read_text()) for r in (directory, reference)]
    assert summaries[0]["objectives"]["ntp"]["val_loss"] == summaries[1]["objectives"]["ntp"]["val_loss"]


def test_a_student_warned_of_its_time_limit_requeues_itself_and_ends_with_the_same_weights(
    cluster, chain, assets, tmp_path
):
    """What slurm does before the time limit (`--signal=B:TERM@120`: SIGTERM to the batch script, sent here by
    `scancel --batch`): the ranks save, the job requeues itself, resumes and completes, and the chain ends
    without being submitted again."""
    reference, _ = chain
    directory = tmp_path / "requeued"
    jobs = training_student(cluster, reference, assets, directory, "ntp")
    run_dir = directory / "run"
    cluster.run("scancel", "--batch", "--signal=TERM", jobs["pretrain-ntp"])
    deadline = time.monotonic() + 120
    while cluster.run("squeue", "-h", "-j", jobs["pretrain-ntp"], "-o", "%T").stdout.strip() != "PENDING":
        assert time.monotonic() < deadline, "the job did not requeue itself"
        time.sleep(0.2)
    # Slurm holds a requeued job for about two minutes before it may start again; once its first run has
    # left the node, the test lets it start, two seconds later (slurmd refuses a job credential issued in
    # the same second as the one it revoked for the first run).
    while "idle" not in cluster.run("sinfo", "-h", "-o", "%T").stdout:
        assert time.monotonic() < deadline, "the requeued job's first run never left the node"
        time.sleep(0.2)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={jobs['pretrain-ntp']}", "StartTime=now")
    cluster.wait_until_idle()
    finished = cluster.finished()
    assert finished[jobs["pretrain-ntp"]]["JobState"] == "COMPLETED"
    assert finished[jobs["report"]]["JobState"] == "COMPLETED"
    log = (directory / "logs" / f"cocomix-pretrain-ntp-{jobs['pretrain-ntp']}.out").read_text()
    assert "pretrain-ntp stopped at the time limit with a checkpoint; requeueing" in log, log[-2000:]
    assert_resumed_to_the_uninterrupted_weights(run_dir, reference, "pretrain-ntp")


def _rank_process(stage: str, rank: int) -> int | None:
    """The pid of the pretraining process of `stage` with this torchrun rank, if it runs now."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"cocomix_cli" in cmdline and f"COCOMIX_STAGE={stage}".encode() in environ:
            if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
                return int(proc.name)
    return None


def test_a_lost_rank_fails_the_job_with_its_reason_and_the_chain_submitted_again_resumes_exactly(
    cluster, chain, assets, tmp_path
):
    reference, _ = chain
    directory = tmp_path / "lost-rank"
    jobs = training_student(cluster, reference, assets, directory, "cocomix")
    run_dir = directory / "run"
    pid = _rank_process("pretrain-cocomix", 1)
    assert pid is not None, "rank 1 of pretrain-cocomix is not running"
    os.kill(pid, signal.SIGKILL)
    cluster.wait_until_idle()

    finished = cluster.finished()
    assert finished[jobs["pretrain-cocomix"]]["JobState"] == "FAILED"
    assert finished[jobs["report"]]["JobState"] == "CANCELLED"
    assert status(run_dir, "pretrain-cocomix") != "complete"
    log = (directory / "logs" / f"cocomix-pretrain-cocomix-{jobs['pretrain-cocomix']}.out").read_text()
    (error,) = [line for line in log.splitlines() if line.startswith("cocomix-pretrain: error:")]
    assert "`cocomix pretrain --objective cocomix` ended with exit code" in error
    assert "pretrain-cocomix is interrupted, not complete (a rank died or was stopped" in error
    assert "Submit the chain again (`bash configs/slurm/submit.sh cocomix.toml`)" in error

    submit(cluster, directory)
    cluster.wait_until_idle()
    assert status(run_dir, "pretrain-cocomix") == "complete"
    resumed, uninterrupted = (
        weights(run_dir, "pretrain-cocomix"),
        weights(reference / "run", "pretrain-cocomix"),
    )
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

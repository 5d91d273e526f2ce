"""The CLI surface: the command list, help, `config show`, `status`."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pipelines.config.loading import load_config
from tests.conftest import cocomix_subprocess, prepared_run, tiny_sae, tiny_teacher
from tests.test_prepare import write_config

COMMANDS = {
    "run",
    "prepare",
    "train-sae",
    "extract-concepts",
    "pretrain",
    "eval",
    "steer",
    "export",
    "concepts",
    "status",
    "config",
}


def test_command_list_is_pinned():
    from typer.main import get_command

    from cocomix_cli.app import app

    assert set(get_command(app).commands) == COMMANDS


def test_help_lists_each_command_with_one_line_help():
    result = subprocess.run([sys.executable, "-m", "cocomix_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in COMMANDS:
        assert any(line.strip("│ ").startswith(command + " ") for line in result.stdout.splitlines()), command
    assert "--set" in result.stdout and "--config" in result.stdout


def command_help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, "-m", "cocomix_cli", *command, "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "command", [(), *((c,) for c in sorted(COMMANDS)), ("concepts", "build"), ("config", "show")]
)
def test_help_names_values_as_click_does_and_hides_no_text(command):
    text = command_help(*command)
    assert not re.search(r"<(bool|str|int|float|path)>", text), text  # Typer's labels of Python types
    assert "``" not in text and "` `" not in text  # an emptied code span: a bracket eaten as markup
    if command == ("pretrain",):
        flat = " ".join(line.strip("│ ") for line in text.splitlines())
        assert "Train the student [run.variants.NAME] (its objective and overrides)" in flat
        assert "pretrain-NAME-seedK/" in flat
        # the docstring's sentences are one paragraph, not its source lines
        assert "a second one stops at once (exit 130)" in " ".join(flat.split())
        assert re.search(r"--seed\s+INTEGER", text) and re.search(r"--resume\s+Continue", text)


def test_config_show_resolves_and_reads_back(tmp_path, cocomix):
    (tmp_path / "cocomix.toml").write_text("[data]\nblock_size = 128\n")
    result = cocomix("config", "show", "--set", "data.max_tokens=99")
    assert result.exit_code == 0
    (tmp_path / "shown.toml").write_text(result.stdout)
    cfg = load_config(tmp_path / "shown.toml")
    assert cfg.data.block_size == 128 and cfg.data.max_tokens == 99
    assert "[pretrain]" in result.stdout


def test_status_reports_each_stage_as_json(tmp_path, cocomix, tokenizer_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} of a small corpus" for i in range(200)))
    write_config(tmp_path, corpus, tokenizer_path, block_size=16, val_fraction=0.0)
    before = json.loads(cocomix("status", "--json").stdout)
    assert before["stages"][0] == {"stage": "prepare", "status": "not started"}
    assert cocomix("prepare").exit_code == 0
    after = json.loads(cocomix("status", "--json").stdout)
    prepare = after["stages"][0]
    assert prepare["status"] == "complete" and len(prepare["fingerprint"]) == 16
    assert prepare["summary"]["train_blocks"] > 0
    table = cocomix("status")
    assert table.exit_code == 0 and "complete" in table.stdout and prepare["fingerprint"] in table.stdout
    assert "no such folder" not in table.stdout
    typo = cocomix("status", "--run-dir", "runz")  # a mistyped folder is not silently an empty run
    assert typo.exit_code == 0 and "run runz (no such folder yet: nothing has run there)" in typo.stdout


def test_global_options_work_before_and_after_the_command(tmp_path, cocomix):
    before = cocomix("--set", "data.block_size=64", "config", "show", "--no-docs")
    after = cocomix("config", "show", "--no-docs", "--set=data.block_size=64")
    assert before.exit_code == after.exit_code == 0
    assert before.stdout == after.stdout and "block_size = 64" in after.stdout


def test_usage_errors_exit_2():
    result = subprocess.run([sys.executable, "-m", "cocomix_cli", "prepare", "--bogus"], capture_output=True)
    assert result.returncode == 2


def test_short_global_options_work_after_the_command(tmp_path, cocomix):
    import logging

    (tmp_path / "other.toml").write_text("[data]\nblock_size = 64\n")
    before = cocomix("-v", "-c", "other.toml", "config", "show", "--no-docs")
    attached = cocomix("config", "show", "--no-docs", "-cother.toml")
    after = cocomix("config", "show", "--no-docs", "-v", "-c", "other.toml")
    assert logging.getLogger("pipelines").level == logging.INFO  # `-v` reached the root, not the command
    assert before.exit_code == attached.exit_code == after.exit_code == 0, after.stderr
    assert before.stdout == attached.stdout == after.stdout and "block_size = 64" in after.stdout


def test_a_command_keeps_its_own_option_that_shares_a_global_letter():
    from typing import Annotated

    import typer
    from typer.testing import CliRunner

    from cocomix_cli.app import CocomixGroup

    seen: dict[str, bool] = {}
    probe = typer.Typer(cls=CocomixGroup)

    @probe.callback()
    def root(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
        seen["global -v"] = verbose

    @probe.command()
    def own(version: Annotated[bool, typer.Option("--version", "-v")] = False) -> None:
        seen["own -v"] = version

    @probe.command()
    def other() -> None:
        pass

    assert CliRunner().invoke(probe, ["own", "-v"]).exit_code == 0
    assert seen == {"global -v": False, "own -v": True}
    assert CliRunner().invoke(probe, ["other", "-v"]).exit_code == 0
    assert seen["global -v"] is True


# --- interrupts: the message names the command that resumes -----------------------------------------------


def advised_command(stderr: str) -> list[str]:
    """The command an interrupted `cocomix` says to run, ready for `subprocess` (one line `... `CMD` ...`)."""
    import re
    import shlex

    advice = re.search(r"run `(cocomix [^`]+)` to resume", stderr)
    assert advice is not None, stderr
    return [sys.executable, "-m", "cocomix_cli", *shlex.split(advice.group(1))[1:]]


@pytest.mark.slow
def test_a_second_ctrl_c_in_pretrain_says_to_rerun_with_resume_and_that_command_continues(tmp_path):
    prepared_run(tmp_path, documents=60)
    # A student big enough that saving a checkpoint takes a while: the second Ctrl-C lands during it.
    student = {
        "pretrain.preset": "tiny",
        "pretrain.n_layer": 4,
        "pretrain.n_head": 4,
        "pretrain.n_embd": 256,
        "pretrain.insert_layer": 2,
        "pretrain.batch_blocks": 4,
        "pretrain.max_steps": 30,
        "pretrain.warmup_steps": 2,
        "pretrain.eval_every": 30,
        "pretrain.eval_blocks": 4,
        "pretrain.save_every": 2,
    }
    settings = [arg for key, value in student.items() for arg in ("--set", f"{key}={value}")]
    args = [*settings, "pretrain", "--objective", "ntp"]
    stage = tmp_path / "run" / "pretrain-ntp"
    process = cocomix_subprocess(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    while not (stage / "checkpoints" / "latest").exists():
        assert process.poll() is None, "pretrain finished before it could be interrupted"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    log = []
    while not log or "SIGINT received" not in log[-1]:  # the first Ctrl-C: finish the step and save ...
        log.append(process.stderr.readline())
        assert log[-1], "".join(log)
    process.send_signal(signal.SIGINT)  # ... the second: stop now
    stderr = "".join(log) + process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr

    same = subprocess.run([sys.executable, "-m", "cocomix_cli", *args], cwd=tmp_path, capture_output=True)
    assert same.returncode == 2 and b"Pass --resume" in same.stderr  # why the advice must say --resume
    advised = advised_command(stderr)
    assert advised[3:7] == ["pretrain", "--resume", "--objective", "ntp"]  # then the --set options
    resumed = subprocess.run(advised, cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((stage / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_sigterm_stops_extract_concepts_with_a_message_and_its_rerun_gives_the_uninterrupted_store(tmp_path):
    from pipelines.sae.formats import save_saelens
    from tests.test_extract import assert_equal_to_one_process, extract_overrides, set_args

    tiny_teacher(tmp_path / "teacher")
    save_saelens(tiny_sae(), tmp_path / "sae")
    prepared_run(tmp_path, documents=60)
    overrides = extract_overrides(tmp_path)
    chunks = tmp_path / "run" / "extract-concepts" / "chunks"
    process = cocomix_subprocess(
        [*set_args(overrides), "extract-concepts"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    while len(list(chunks.glob("*.json"))) < 3:
        assert process.poll() is None, "extraction finished before it could be stopped"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr  # as for Ctrl-C, and for `cocomix run` stopped by SIGTERM
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    manifest = json.loads((chunks.parent / "manifest.json").read_text())
    assert manifest["status"] == "running"  # stopped part way: the rerun has chunks left to do

    resumed = subprocess.run(advised_command(stderr), cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_equal_to_one_process(tmp_path, overrides, documents=60)

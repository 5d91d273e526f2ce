"""The CLI surface: the command list, help, `config show`, `status`."""

import json
import subprocess
import sys

from pipelines.config import load_config
from tests.test_prepare import write_config

COMMANDS = {
    "run",
    "prepare",
    "train-sae",
    "extract-concepts",
    "pretrain",
    "eval",
    "steer",
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


def test_global_options_work_before_and_after_the_command(tmp_path, cocomix):
    before = cocomix("--set", "data.block_size=64", "config", "show", "--no-docs")
    after = cocomix("config", "show", "--no-docs", "--set=data.block_size=64")
    assert before.exit_code == after.exit_code == 0
    assert before.stdout == after.stdout and "block_size = 64" in after.stdout


def test_usage_errors_exit_2():
    result = subprocess.run([sys.executable, "-m", "cocomix_cli", "prepare", "--bogus"], capture_output=True)
    assert result.returncode == 2

"""The stage registry: the steps as the CLI and schedulers know them, and a stage declared by this test alone
that `cocomix run` plans, accepts in `--from` / `--until` and runs, with no edit anywhere else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config.schema import Config
from pipelines.core import stage_registry
from pipelines.core.files import read_json
from pipelines.core.layout import MANIFEST, PREPARE_STAGE
from pipelines.core.session import StageSession
from pipelines.core.stage_registry import StagePlan, StageSpec, register_stage
from tests.cli.test_bad_input import assert_one_line_error
from tests.conftest import Cocomix, bpe_tokenizer, corpus_jsonl, write_run_config

NTP_ONLY = ("--set", 'run.objectives=["ntp"]')  # no teacher needed


# --- the worked example of docs/DEVELOPMENT.md, "Adding a stage" -------------------------------------------


def plan_count_blocks(cfg: Config) -> list[StagePlan]:
    """One folder, `count-blocks/`, for every config; its output depends on no config value of its own."""
    return [StagePlan("count the prepared train blocks")]


def run_count_blocks(cfg: Config, row, progress: bool) -> None:
    """Read what prepare wrote; write `blocks.txt`. The session makes it skipped once complete."""
    run_dir = Path(cfg.run.dir)
    prepared = read_json(run_dir / PREPARE_STAGE / MANIFEST)["summary"]
    with StageSession(run_dir, row.stage, inputs={}) as session:
        if not session.up_to_date:
            (session.dir / "blocks.txt").write_text(f"{prepared['train_blocks']}\n")
            session.complete({"train_blocks": prepared["train_blocks"]}, outputs=["blocks.txt"])


COUNT_BLOCKS = StageSpec(
    "count-blocks",
    folder="count-blocks",
    planner=f"{__name__}:plan_count_blocks",
    runner=f"{__name__}:run_count_blocks",
    after="prepare",
)


@pytest.fixture
def count_blocks(monkeypatch) -> StageSpec:
    """The toy stage, registered right after prepare for this test only."""
    monkeypatch.setattr(stage_registry, "REGISTRY", dict(stage_registry.REGISTRY))
    return register_stage(COUNT_BLOCKS, before="train-sae")


# ------------------------------------------------------------------------------------------------------------


def test_the_steps_their_commands_and_resume_flags_are_those_the_cli_has_always_had():
    from cocomix_cli.commands.run_cmd import STEP_NAMES
    from cocomix_cli.interrupts import resume_flags

    assert stage_registry.steps() == (
        "prepare",
        "train-sae",
        "extract-concepts",
        "pretrain",
        "eval",
        "steer",
        "report",
    )
    assert STEP_NAMES == "prepare, train-sae, extract-concepts, pretrain, eval, steer, report"
    assert resume_flags() == {
        "run": None,
        "prepare": None,
        "train-sae": None,
        "extract-concepts": None,
        "pretrain": "--resume",
        "eval": None,
    }


def test_a_stage_is_registered_once_and_only_before_a_stage(monkeypatch):
    monkeypatch.setattr(stage_registry, "REGISTRY", dict(stage_registry.REGISTRY))
    with pytest.raises(ValueError, match="registered twice"):
        register_stage(stage_registry.stage_spec("prepare"))
    with pytest.raises(ValueError, match="not a stage"):
        register_stage(COUNT_BLOCKS, before="tokenize")


@pytest.mark.slow
def test_a_stage_declared_only_in_a_test_is_planned_chosen_by_from_and_run(count_blocks, tmp_path):
    source = corpus_jsonl(tmp_path / "corpus.jsonl", 60)
    tokenizer = bpe_tokenizer().json
    write_run_config(tmp_path, source=str(source), tokenizer=str(tokenizer), block_size=32, val_fraction=0.2)
    cocomix = Cocomix(tmp_path)

    plan = json.loads(cocomix("run", "--dry-run", "--json", *NTP_ONLY).stdout)["plan"]
    assert [row["stage"] for row in plan] == ["prepare", "count-blocks", "pretrain-ntp", "eval", "report"]
    (row,) = [row for row in plan if row["step"] == "count-blocks"]
    assert row["after"] == "prepare" and row["action"] == "run"
    assert row["command"] == "cocomix run --from count-blocks --until count-blocks"

    chained = cocomix("run", "--until", "count-blocks", *NTP_ONLY)
    assert chained.exit_code == 0, chained.stderr
    assert "[1/2] prepare: run" in chained.stdout and "[2/2] count-blocks: run" in chained.stdout
    manifest = read_json(tmp_path / "run" / "count-blocks" / MANIFEST)
    assert manifest["status"] == "complete"
    blocks = (tmp_path / "run" / "count-blocks" / "blocks.txt").read_text()
    assert int(blocks) == manifest["summary"]["train_blocks"] > 0

    again = cocomix("run", "--from", "count-blocks", "--until", "count-blocks", *NTP_ONLY)
    assert again.exit_code == 0, again.stderr
    assert "[1/1] count-blocks: skip (complete)" in again.stdout

    wrong = cocomix("run", "--from", "count", *NTP_ONLY)
    assert_one_line_error(wrong, "--from 'count' is not a step; choose from prepare, count-blocks, train-sae")

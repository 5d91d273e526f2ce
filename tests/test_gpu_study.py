"""benchmarks/gpu_study.py --dry-run: the GPU study's code path end to end on CPU, offline.

The script drives `cocomix run` (prepare -> train-sae -> extract-concepts -> pretrain ntp and cocomix) on
the quickstart config with its overrides; here the teacher (and so the tokenizer) is a tiny random GPT-2
saved like a hub checkpoint, and the corpus is the committed plays.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_DATA, tiny_teacher

pytestmark = pytest.mark.slow

SCRIPT = REPO / "benchmarks" / "gpu_study.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("gpu-study")
    teacher = tiny_teacher(root / "teacher")
    run_dir = root / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--run-dir",
            str(run_dir),
            "--teacher",
            str(teacher),
            "--corpus",
            str(TEST_DATA / "corpus" / "*.txt"),
            "--set",
            "teacher.layer=1",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def manifest_summary(run_dir: Path, objective: str) -> dict:
    manifest = json.loads((run_dir / f"pretrain-{objective}" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    return manifest["summary"]


def test_dry_run_prints_a_row_per_student_and_the_difference_of_the_manifests(dry_run):
    run_dir, result = dry_run
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("student "))
    assert header.split() == ["student", "params", "tokens", "tokens/s", "MFU", "val", "ppl", "wall", "s"]
    for objective in ("ntp", "cocomix"):
        summary = manifest_summary(run_dir, objective)
        (row,) = [line.split() for line in lines if line.startswith(f"{objective} ")]
        assert row[0] == objective and len(row) == 7
        assert int(row[2].replace(",", "")) == summary["tokens"] == 8 * 4 * 128
        assert row[4] == "-"  # MFU is computed on CUDA only
        assert float(row[5].replace(",", "")) == pytest.approx(summary["val_ppl"], abs=5e-5)
    (line,) = [line for line in lines if line.startswith("val ppl CoCoMix - NTP: ")]
    printed = float(line.removeprefix("val ppl CoCoMix - NTP: "))
    expected = manifest_summary(run_dir, "cocomix")["val_ppl"] - manifest_summary(run_dir, "ntp")["val_ppl"]
    assert printed == pytest.approx(expected, abs=5e-5)


def test_dry_run_writes_the_numbers_and_commands_to_gpu_study_json(dry_run):
    run_dir, _ = dry_run
    study = json.loads((run_dir / "gpu_study.json").read_text())
    assert study["mode"] == "dry-run" and study["exit_code"] == 0
    assert set(study["students"]) == {"ntp", "cocomix"}
    for objective, student in study["students"].items():
        summary = manifest_summary(run_dir, objective)
        assert math.isfinite(student["val_ppl"]) and student["val_ppl"] > 0
        assert student["val_ppl"] == summary["val_ppl"]
        assert student["tokens"] == summary["tokens"] > 0
        assert student["parameters"] == summary["parameters"] > 0
        assert student["tokens_per_s"] > 0 and student["mfu"] is None
        assert student["wall_s"] > 0
    ntp, cocomix = study["students"]["ntp"], study["students"]["cocomix"]
    assert study["val_ppl_cocomix_minus_ntp"] == pytest.approx(cocomix["val_ppl"] - ntp["val_ppl"])
    assert cocomix["parameters"] != ntp["parameters"]  # two different students, not one read twice
    assert "--dry-run" in study["command"] and "--teacher" in study["command"]
    # The real CLI ran: prepare alone first (the SAE's sizes follow the corpus), then the chain to pretrain.
    assert [re.search(r"run --until (\S+)$", c).group(1) for c in study["cocomix_commands"]] == [
        "prepare",
        "pretrain",
    ]
    assert all(
        "pretrain.preset=tiny" in c and "pretrain.compile=false" in c for c in study["cocomix_commands"]
    )
    for stage in ("prepare", "train-sae", "extract-concepts"):
        assert study["stages_wall_s"][stage] > 0
        assert json.loads((run_dir / stage / "manifest.json").read_text())["status"] == "complete"


def load_study():
    spec = importlib.util.spec_from_file_location("gpu_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_gpu_settings_are_a_valid_plan_of_one_69m_student_per_objective(tmp_path):
    """The GPU run's overrides pass the config checks of `cocomix run --dry-run` (the plan), without a GPU."""
    study = load_study()
    args = study.parse_args(["--run-dir", str(tmp_path / "run")])
    steps = study.planned_steps(args, study.GPU)
    assert study.GPU.tokens_per_step == 32 * 2 * 1024
    assert steps * study.GPU.tokens_per_step == study.budget_tokens(8.0, 65536) == 305 * 65536  # docstring
    assert study.planned_steps(study.parse_args(["--tokens", "10000000"]), study.GPU) == 152
    extra, stages = study.plan(args, study.GPU, steps, compile_=True)
    assert stages == {"ntp": "pretrain-ntp", "cocomix": "pretrain-cocomix"}
    sets = study.overrides(args, study.GPU, steps, True, 1_480_000, extra)
    assert sets["pretrain.preset"] == "69m" and sets["pretrain.dtype"] == "bfloat16"
    assert sets["pretrain.compile"] == "true" and sets["pretrain.max_steps"] == str(steps)
    assert sets["sae.train_tokens"] == str(1_480_000 // 4096 * 4096)  # capped by the corpus
    assert {sets[f"{s}.device"] for s in ("sae", "extract", "pretrain")} == {"cuda"}
    # A user's --set comes last and wins.
    args = study.parse_args(["--run-dir", str(tmp_path / "run"), "--set", "pretrain.lr=1e-3"])
    assert list(study.overrides(args, study.GPU, steps, True, None, extra).items())[-1] == (
        "pretrain.lr",
        "1e-3",
    )

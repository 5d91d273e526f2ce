"""Students of a run: seeds as an axis (2 x 2 students, the paired difference and its t-interval), named
variants (their settings read back from their manifests, the shared stages run once), and the ablations
they make config: concepts without mixing, targets by SAE activation."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config.loading import load_config
from pipelines.model.gpt import GPT, preset
from pipelines.stages import report
from tests.conftest import Cocomix, tiny_teacher
from tests.test_workflow import write_tiny_pipeline

# Student's t, two-sided 95%, 1 degree of freedom: the tabulated 12.706 (e.g. NIST/SEMATECH e-Handbook,
# table 1.3.6.7.2), to three decimals; the report takes it from scipy.
T_975_DF1 = 12.706

SEEDED = ["prepare", "train-sae", "extract-concepts"]
STUDENTS = ["pretrain-ntp-seed0", "pretrain-ntp-seed1", "pretrain-cocomix-seed0", "pretrain-cocomix-seed1"]


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> tuple[Path, str]:
    """The tiny pipeline with `run.seeds = [0, 1]`: ntp and cocomix, two seeds each."""
    directory = tmp_path_factory.mktemp("seeds")
    teacher = tiny_teacher(tmp_path_factory.mktemp("teacher") / "gpt2")
    config = write_tiny_pipeline(directory, teacher)
    objectives = 'objectives = ["ntp", "cocomix"]'
    config.write_text(config.read_text().replace(objectives, f"{objectives}\nseeds = [0, 1]"))
    result = Cocomix(directory)("run")
    assert result.exit_code == 0, result.stderr
    return directory, result.stdout


def test_two_seeds_train_two_by_two_students_and_the_paired_interval_is_the_t_interval(two_seeds):
    directory, stdout = two_seeds
    run_dir = directory / "run"
    for stage in SEEDED:  # upstream once, whatever the seeds
        assert stdout.count(f"] {stage}: run (") == 1
    val_ppl = {}
    for stage in STUDENTS:
        trained = manifest(run_dir, stage)
        assert trained["status"] == "complete"
        assert trained["inputs"]["run.seed"] == int(stage[-1])
        val_ppl[stage] = trained["summary"]["val_ppl"]
    # the seeds differ (init and data order), so the students do
    assert val_ppl["pretrain-ntp-seed0"] != val_ppl["pretrain-ntp-seed1"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    ntp = summary["objectives"]["ntp"]
    ntp_values = [val_ppl["pretrain-ntp-seed0"], val_ppl["pretrain-ntp-seed1"]]
    assert ntp["n_seeds"] == 2 and ntp["val_ppl"] == pytest.approx(statistics.fmean(ntp_values), rel=1e-12)
    assert ntp["spread"]["val_ppl"] == pytest.approx(abs(ntp_values[0] - ntp_values[1]) / math.sqrt(2))

    differences = [val_ppl[f"pretrain-cocomix-seed{s}"] - val_ppl[f"pretrain-ntp-seed{s}"] for s in (0, 1)]
    mean = (differences[0] + differences[1]) / 2
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (2 - 1))
    half = T_975_DF1 * sd / math.sqrt(2)
    paired = summary["paired_with"]["ntp"]["cocomix"]["val_ppl"]
    assert paired["n"] == 2 and paired["seeds"] == [0, 1]
    assert paired["mean"] == pytest.approx(mean, rel=1e-12)
    assert paired["sd"] == pytest.approx(sd, rel=1e-12)
    assert paired["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-4)  # the table's 3 decimals
    decided = paired["ci95"][0] > 0 or paired["ci95"][1] < 0
    assert paired["verdict"] == (
        ("worse" if mean > 0 else "better") if decided else "not decided (the interval holds 0)"
    )
    low, high = paired["ci95"]
    assert f"cocomix - ntp, val_ppl: {mean:+.2f}, 95% CI [{low:+.2f}, {high:+.2f}] over seeds 0, 1" in stdout
    text = (run_dir / "report.md").read_text()
    assert "## Against `ntp`, paired by seed" in text
    assert f"| cocomix | val_ppl | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] | 0, 1 |" in text
    assert f"| val perplexity (mean ± sd) | {ntp['val_ppl']:,.2f} ± {ntp['spread']['val_ppl']:.2f} |" in text


def test_each_student_is_compared_with_each_baseline_and_each_pair_once():
    names = ["ntp", "kd", "cocomix", "cocomix_lam1"]
    assert report.comparisons(names, ["ntp", "kd"]) == [
        ("kd", "ntp"),
        ("cocomix", "ntp"),
        ("cocomix_lam1", "ntp"),
        ("cocomix", "kd"),
        ("cocomix_lam1", "kd"),
    ]
    assert report.comparisons(names, ["kd", "ntp"])[:3] == [
        ("ntp", "kd"),
        ("cocomix", "kd"),
        ("cocomix_lam1", "kd"),
    ]
    assert report.comparisons(["cocomix", "kd"], ["ntp"]) == []  # a baseline the run does not train
    assert report.comparisons(names, ["ntp", "ntp"]) == report.comparisons(names, ["ntp"])


def test_the_loss_curves_are_the_mean_over_seeds_with_a_min_max_band(two_seeds):
    directory, _ = two_seeds
    cfg = load_config(directory / "cocomix.toml")
    val = report.loss_series(directory / "run", report.student_folders(cfg))["ntp"]["val"]
    rows = {}
    for seed in (0, 1):
        lines = (directory / "run" / f"pretrain-ntp-seed{seed}" / "metrics.jsonl").read_text().splitlines()
        rows[seed] = {r["step"]: r["val_loss"] for r in map(json.loads, lines) if r["kind"] == "val"}
    assert [s for s, _ in val.points] == sorted(rows[0]) == [0, 4, 8, 12]
    for (step, mean), (_, low, high) in zip(val.points, val.band, strict=True):
        assert mean == pytest.approx((rows[0][step] + rows[1][step]) / 2)
        assert (low, high) == (min(rows[0][step], rows[1][step]), max(rows[0][step], rows[1][step]))


def test_status_and_the_plan_list_every_seed(two_seeds):
    directory, _ = two_seeds
    status = Cocomix(directory)("status", "--json")
    assert status.exit_code == 0, status.stderr
    states = {row["stage"]: row["status"] for row in json.loads(status.stdout)["stages"]}
    assert all(states[stage] == "complete" for stage in STUDENTS)
    plan = Cocomix(directory)("run", "--dry-run", "--json")
    rows = {row["stage"]: row for row in json.loads(plan.stdout)["plan"]}
    assert all(rows[stage]["action"] == "skip" for stage in STUDENTS)
    assert "seed 1" in rows["pretrain-cocomix-seed1"]["detail"]
    # A changed setting reruns only the students that read it: `mixing` is CoCoMix's alone.
    changed = Cocomix(directory)("run", "--dry-run", "--json", "--set", "pretrain.mixing=add")
    actions = {row["stage"]: (row["action"], row["state"]) for row in json.loads(changed.stdout)["plan"]}
    for stage in STUDENTS:
        action, state = actions[stage]
        if "cocomix" in stage:
            assert action == "refuse" and "pretrain.mixing" in state
        else:
            assert (action, state) == ("skip", "complete")


def test_one_seed_reports_the_difference_and_says_no_interval_can_be_given(two_seeds, tmp_path):
    directory, _ = two_seeds
    result = Cocomix(directory)("run", "--from", "eval", "--set", "run.seeds=[1]")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((directory / "run" / "summary.json").read_text())
    paired = summary["paired_with"]["ntp"]["cocomix"]["val_ppl"]
    assert paired["n"] == 1 and paired["ci95"] is None and paired["verdict"] == "one seed: no interval"
    assert "cocomix - ntp, val_ppl: " in result.stdout
    assert "(seed 1 only: one seed gives no interval; set `run.seeds`)" in result.stdout
    Cocomix(directory)("run", "--from", "eval")  # back to two seeds for the tests after this one


VARIANTS = """
[run.variants.cocomix_none]
objective = "cocomix"
"pretrain.mixing" = "none"
"pretrain.lam_concept" = 0.5

[run.variants.cocomix_act]
objective = "cocomix"
"pretrain.concept_targets" = "activation"
"""


def test_a_variant_trains_with_exactly_its_overrides_and_reuses_the_shared_stages(two_seeds):
    directory, _ = two_seeds
    config = directory / "cocomix.toml"
    config.write_text(
        config.read_text().replace(
            'objectives = ["ntp", "cocomix"]',
            'objectives = ["ntp", "cocomix", "cocomix_none", "cocomix_act"]',
        )
        + VARIANTS
    )
    result = Cocomix(directory)("run")
    assert result.exit_code == 0, result.stderr
    for stage in SEEDED + STUDENTS:
        assert f"] {stage}: skip (complete)" in result.stdout
    run_dir = directory / "run"
    base = manifest(run_dir, "pretrain-cocomix-seed0")
    for name, changed in (
        ("cocomix_none", {"pretrain.mixing": "none", "pretrain.lam_concept": 0.5, "model.mixing": "none"}),
        ("cocomix_act", {"pretrain.concept_targets": "activation"}),
    ):
        for seed in (0, 1):
            trained = manifest(run_dir, f"pretrain-{name}-seed{seed}")
            assert trained["status"] == "complete"
            inputs = trained["inputs"]
            assert {k: inputs[k] for k in changed} == changed
            expected = {**base["inputs"], **changed, "run.seed": seed}
            assert inputs == expected  # nothing else differs from plain cocomix
            # read the same upstream artifacts: the extraction ran once for all of them
            assert trained["input_artifacts"] == base["input_artifacts"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["paired_with"]["ntp"]) == {"cocomix", "cocomix_none", "cocomix_act"}
    assert summary["paired_with"]["ntp"]["cocomix_act"]["val_ppl"]["n"] == 2


def test_targets_by_activation_are_the_k_most_active_sae_latents():
    from pipelines.training.objectives import CoCoMixByActivation, host_tensors, objective_for

    cfg = load_config(None, ["pretrain.concept_targets=activation", "extract.concepts_per_token=2"])
    objective = objective_for(cfg)
    assert isinstance(objective, CoCoMixByActivation)
    sae_ids = np.array([[[7, 3, 9, 1], [2, 4, 6, 8]]], dtype=np.int32)
    sae_acts = np.array([[[0.5, 2.0, 1.0, 0.1], [0.3, 0.2, 0.9, 0.4]]], dtype=np.float16)
    valid = np.array([[True, False]])
    batch = host_tensors({"sae_ids": sae_ids, "sae_acts": sae_acts, "valid": valid})
    inputs = objective.inputs(torch.zeros(1, 2), batch)
    assert inputs["concept_ids"].tolist() == [[[3, 9], [6, 8]]]
    assert inputs["valid"].tolist() == [[True, False]]


def test_without_mixing_the_concepts_are_predicted_but_leave_the_token_stream_alone():
    torch.manual_seed(0)
    config = preset("tiny", "cocomix", n_layer=2, n_head=2, n_embd=32, insert_layer=1, n_concepts=64,
                    concept_k=4, vocab_size=100, context_length=16, mixing="none")  # fmt: skip
    model = GPT(config).eval()
    ids = torch.randint(0, 100, (2, 10))
    out = model(ids)
    assert out.logits.shape == (2, 10, 100) and out.concept_logits.shape == (2, 10, 64)
    with torch.no_grad():
        model.concepts.compress_weight.normal_()  # the compression is not mixed in: nothing changes
        model.concepts.compress_bias.normal_()
    again = model(ids)
    assert torch.equal(again.logits, out.logits) and torch.equal(again.concept_logits, out.concept_logits)

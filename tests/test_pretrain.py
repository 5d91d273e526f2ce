"""pretrain: exact resume (SIGKILL, SIGTERM), torchrun ranks, cached = online targets, objectives learn."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from matplotlib.image import imread
from safetensors.torch import load_file

from pipelines.concepts.targets import online_concept_targets
from pipelines.concepts.teacher import load_teacher
from pipelines.config.loading import load_config
from pipelines.core.plot import HEIGHT_PX, WIDTH_PX
from pipelines.data.batches import BatchOrder
from pipelines.errors import ConfigError, StageError
from pipelines.sae.formats import load_sae, save_saelens
from pipelines.stages import extract, prepare, pretrain
from pipelines.training.objectives import kd_loss
from tests import conftest
from tests.conftest import (
    ReadBacks,
    assert_kills_during_the_force_clear_rerun_to_the_same_result,
    cocomix_subprocess,
    prepared_run,
    tiny_sae,
    tiny_teacher,
)

TEACHER = {
    "teacher.layer": 1,
    "extract.blocks_per_chunk": 8,
    "extract.tokens_per_batch": 256,
    "extract.store_teacher_topk": 8,  # the fixture's store has them, for `kd`
}
STUDENT = {
    "pretrain.preset": "tiny",
    "pretrain.n_layer": 2,
    "pretrain.n_head": 2,
    "pretrain.n_embd": 32,
    "pretrain.insert_layer": 1,
    "pretrain.concept_k": 4,
    "pretrain.batch_blocks": 4,
    "pretrain.max_steps": 12,
    "pretrain.warmup_steps": 2,
    "pretrain.lr": 3e-3,
    "pretrain.log_every": 1,
    "pretrain.eval_every": 6,
    "pretrain.eval_blocks": 8,
    "pretrain.save_every": 4,
}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A prepared run with a tiny teacher and SAE, concepts and teacher top-8 log-probs extracted."""
    base = tmp_path_factory.mktemp("extracted")
    tiny_teacher(base / "teacher")
    peaked_next_token_distributions(base / "teacher")
    save_saelens(tiny_sae(), base / "sae")
    prepared_run(base, documents=100)
    run_in(base, extract.run, overrides(base))
    return base


def peaked_next_token_distributions(folder: Path) -> None:
    """Scale the tied embeddings so the random teacher's top-8 tokens hold real mass (KD has a signal)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40.0)
    model.save_pretrained(folder)


@pytest.fixture
def run(tmp_path, extracted):
    shutil.copytree(extracted, tmp_path, dirs_exist_ok=True)
    return tmp_path


def overrides(base: Path, **extra) -> list[str]:
    values = {
        "teacher.model": str(base / "teacher"),
        "sae.path": str(base / "sae"),
        **TEACHER,
        **STUDENT,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_in(directory: Path, stage, args: list[str], **kwargs):
    """The stage's result with its folder made absolute (the run dir is relative to `directory`)."""
    result = conftest.run_in(directory, stage, args, **kwargs)
    return dataclasses.replace(result, dir=directory / result.dir) if hasattr(result, "dir") else result


def rows(stage_dir: Path, kind: str) -> list[dict]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


def weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "model" / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def cli_args(base: Path, **extra) -> list[str]:
    return [arg for o in overrides(base, **extra) for arg in ("--set", o)]


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, "the run finished before it could be interrupted"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def killed_at(run: Path, args: list[str], instant: str) -> None:
    """`cocomix ARGS` SIGKILLed by itself at the named kill point."""
    process = cocomix_subprocess(args, cwd=run, env={**os.environ, "COCOMIX_KILL_AT": instant})
    assert process.wait(timeout=300) == -signal.SIGKILL, instant


def resumed(run: Path, args: list[str]) -> str:
    """`cocomix --verbose ARGS --resume` to the end; its log."""
    result = subprocess.run(
        [sys.executable, "-m", "cocomix_cli", "--verbose", *args, "--resume"],
        cwd=run,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


# --- exact resume ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_bitwise_equal_weights(run):
    straight = run_in(run, pretrain.run, overrides(run, **{"pretrain.objective": "cocomix"}))
    reference = weights(straight.dir)
    reference_rows = rows(straight.dir, "train")
    shutil.rmtree(straight.dir)

    args = [
        *cli_args(run, **{"pretrain.objective": "cocomix", "pretrain.keep_last": 1}),
        "--no-progress",
        "pretrain",
    ]
    process = cocomix_subprocess(args, cwd=run)
    wait_for(straight.dir / "checkpoints" / "latest", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (straight.dir / "model").exists()

    refused = subprocess.run(
        [sys.executable, "-m", "cocomix_cli", *args], cwd=run, capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "has checkpoints up to step" in refused.stderr and "Pass --resume" in refused.stderr

    assert "resuming pretrain-cocomix at step" in resumed(run, args)
    assert_bitwise_equal(weights(straight.dir), reference)
    kept = sorted(p.name for p in (straight.dir / "checkpoints").iterdir())
    assert kept == ["latest", "step-000008"]  # keep_last = 1; steps 4 and 8 were saved
    resumed_rows = rows(straight.dir, "train")
    assert [r["step"] for r in resumed_rows] == list(range(1, 13))
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in reference_rows]


def uninterrupted_run(run: Path, objective: str = "ntp") -> tuple[Path, dict[str, torch.Tensor], list[str]]:
    """An uninterrupted run's final weights, its folder emptied again, and the command that makes it.

    Its fingerprint is kept in `REFERENCE_FINGERPRINTS[stage folder]`, for the tests that compare it."""
    settings = {"pretrain.objective": objective}
    straight = run_in(run, pretrain.run, overrides(run, **settings))
    reference = weights(straight.dir)
    REFERENCE_FINGERPRINTS[straight.dir] = straight.fingerprint
    shutil.rmtree(straight.dir)
    return straight.dir, reference, [*cli_args(run, **settings), "pretrain"]


REFERENCE_FINGERPRINTS: dict[Path, str] = {}


def assert_same_fingerprint_as_the_uninterrupted_run(stage_dir: Path) -> None:
    assert conftest.stage_status(stage_dir.parent.parent, stage_dir.name) == "complete"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == REFERENCE_FINGERPRINTS[stage_dir]


@pytest.mark.slow
def test_a_kill_between_a_checkpoint_and_its_pointer_resumes_from_that_checkpoint(run):
    stage_dir, reference, args = uninterrupted_run(run)
    killed_at(run, args, "checkpoint:step-000008:renamed")
    assert conftest.stage_status(run, "pretrain-ntp") == "interrupted"
    checkpoints = stage_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000004"  # the pointer was not moved yet
    log = resumed(run, args)
    assert "resuming pretrain-ntp at step 8 of 12" in log
    assert_bitwise_equal(weights(stage_dir), reference)
    assert_same_fingerprint_as_the_uninterrupted_run(stage_dir)


@pytest.mark.slow
def test_a_kill_at_each_step_of_the_force_clear_then_a_rerun_gives_the_same_weights(run):
    stage_dir, reference, args = uninterrupted_run(run)
    assert subprocess.run([sys.executable, "-m", "cocomix_cli", *args], cwd=run).returncode == 0
    assert_kills_during_the_force_clear_rerun_to_the_same_result(
        run, args, "pretrain-ntp", lambda: weights(stage_dir), assert_bitwise_equal
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", ["flipped weights and a garbage pointer", "truncated trainer state", "random bytes as weights"]
)
def test_a_damaged_latest_checkpoint_is_named_and_resume_falls_back_to_the_one_before(run, damage):
    stage_dir, reference, args = uninterrupted_run(run)
    killed_at(run, args, "checkpoint:step-000008:latest")
    newest = stage_dir / "checkpoints" / "step-000008"
    if damage == "truncated trainer state":
        state = newest / "trainer.pt"
        state.write_bytes(state.read_bytes()[:1000])
        named = "trainer.pt does not match its digest"
    elif damage == "random bytes as weights":
        weights_file = newest / "model.safetensors"
        weights_file.write_bytes(np.random.default_rng(0).bytes(weights_file.stat().st_size))
        named = "model.safetensors does not match its digest"
    else:
        weights_file = newest / "model.safetensors"
        data = bytearray(weights_file.read_bytes())
        data[-64:-60] = bytes(255 - b for b in data[-64:-60])  # four bytes inside the last tensor
        weights_file.write_bytes(bytes(data))
        (stage_dir / "checkpoints" / "latest").write_text("garbage\n")
        named = "model.safetensors does not match its digest"
    log = resumed(run, args)
    assert (
        f"checkpoint {newest.relative_to(run)} is damaged: {named}; falling back to the one before it" in log
    )
    assert "resuming pretrain-ntp at step 4 of 12" in log
    assert_bitwise_equal(weights(stage_dir), reference)
    assert_same_fingerprint_as_the_uninterrupted_run(stage_dir)
    kept = sorted(p.name for p in (stage_dir / "checkpoints").iterdir())
    assert kept == ["latest", "step-000004", "step-000008"]  # step 8 written again, nothing intact pruned


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])  # twice: slurmstepd and torchrun both forward it to each rank
def test_sigterm_saves_a_checkpoint_exits_0_and_resume_matches(run, signals):
    straight = run_in(run, pretrain.run, overrides(run, **{"pretrain.objective": "ntp"}))
    reference = weights(straight.dir)
    shutil.rmtree(straight.dir)

    # save_every beyond max_steps: the only checkpoint is the one the signal causes.
    args = [
        *cli_args(run, **{"pretrain.objective": "ntp", "pretrain.save_every": 100}),
        "--no-progress",
        "pretrain",
    ]
    process = cocomix_subprocess(args, cwd=run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(straight.dir / "metrics.jsonl", process)
    while len(rows(straight.dir, "train")) < 2:
        time.sleep(0.01)
    for _ in range(signals):
        process.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped by SIGTERM after step" in stdout and "cocomix pretrain --resume" in stdout
    latest = (straight.dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step-"))
    assert 2 <= stopped_at < 12
    assert json.loads((straight.dir / "manifest.json").read_text())["status"] == "running"

    changed = subprocess.run(
        [sys.executable, "-m", "cocomix_cli", *args, "--set", "pretrain.lr=0.001", "--resume"],
        cwd=run,
        capture_output=True,
        text=True,
    )
    assert changed.returncode == 2 and "pretrain.lr: 0.003 -> 0.001" in changed.stderr, changed.stderr

    resumed(run, args)
    assert_bitwise_equal(weights(straight.dir), reference)
    again = subprocess.run(
        [sys.executable, "-m", "cocomix_cli", *args], cwd=run, capture_output=True, text=True
    )
    assert again.returncode == 0 and "up to date" in again.stdout


# --- distributed ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_process_with_twice_the_batch(run, sharding):
    settings = {
        "pretrain.objective": "cocomix",
        "pretrain.max_steps": 6,
        "pretrain.fsdp": str(sharding == "fsdp").lower(),
    }
    single = run_in(run, pretrain.run, overrides(run, **settings, **{"pretrain.batch_blocks": 4}))
    single_rows, single_val = rows(single.dir, "train"), rows(single.dir, "val")
    single_weights = weights(single.dir)
    shutil.rmtree(single.dir)

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
        "29531" if sharding == "ddp" else "29532",
        "-m", "cocomix_cli", "--no-progress", *cli_args(run, **settings, **{"pretrain.batch_blocks": 2}),
        "pretrain", "--json",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=run, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranked_rows = rows(single.dir, "train")
    assert [r["step"] for r in ranked_rows] == [r["step"] for r in single_rows]
    for name in ("loss", "ntp_loss", "concept_loss"):
        np.testing.assert_allclose(
            [r[name] for r in ranked_rows], [r[name] for r in single_rows], rtol=0, atol=1e-5, err_msg=name
        )
    # FSDP's sharded norm differs from the dense one by up to ~3e-4 relative (not yet explained).
    np.testing.assert_allclose(
        [r["grad_norm"] for r in ranked_rows],
        [r["grad_norm"] for r in single_rows],
        rtol=1e-3 if sharding == "fsdp" else 0,
        atol=0 if sharding == "fsdp" else 1e-5,
    )
    np.testing.assert_allclose(
        [r["val_loss"] for r in rows(single.dir, "val")], [r["val_loss"] for r in single_val], atol=1e-5
    )
    for name, tensor in weights(single.dir).items():  # Adam magnifies FSDP's tiny gradient differences
        torch.testing.assert_close(
            tensor, single_weights[name], atol=1e-4 if sharding == "fsdp" else 1e-5, rtol=0
        )
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("{")]  # rank 0 reports
    summary = json.loads(line)
    assert summary["ranks"] == 2 and summary["tokens"] == 6 * 4 * 32


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    order = BatchOrder(n_blocks=10, seed=3, global_batch=4)
    first_epoch = np.concatenate([order.rows(0), order.rows(1), order.rows(2)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert np.array_equal(order.rows(7), BatchOrder(10, 3, 4).rows(7))
    assert not np.array_equal(order.rows(0), BatchOrder(10, 4, 4).rows(0))


# --- the cache is faithful ------------------------------------------------------------------------------


def test_cached_targets_train_exactly_like_the_online_teacher(run):
    settings = {"pretrain.objective": "cocomix", "pretrain.max_steps": 3, "pretrain.eval_every": 100}
    cached = run_in(run, pretrain.run, overrides(run, **settings))
    online = run_in(run, pretrain.run, overrides(run, **settings), online_teacher=True)
    assert online.dir.name == "pretrain-cocomix-online"

    # Same targets: the online computation of the first batch equals the stored rows.
    store = zarr.open_group(str(run / "run/extract-concepts/concepts.zarr"), mode="r")
    tokens = zarr.open_group(str(run / "run/prepare/tokens.zarr"), mode="r")["train"]
    block_rows = BatchOrder(tokens.shape[0], 0, 4).rows(0)
    teacher = load_teacher(str(run / "teacher"), layer=1, hook="resid_post", device="cpu")
    ids = torch.from_numpy(tokens.oindex[block_rows].astype(np.int64))
    targets, valid = online_concept_targets(teacher, load_sae(str(run / "sae")).sae, ids, 4, "official")
    assert np.array_equal(targets.numpy(), store["train"]["concept_ids"].oindex[block_rows].astype(np.int64))
    assert np.array_equal(valid.numpy(), store["train"]["valid"].oindex[block_rows])

    # Same losses, step by step, and the same weights.
    for a, b in zip(rows(cached.dir, "train"), rows(online.dir, "train"), strict=True):
        for name in ("loss", "ntp_loss", "concept_loss"):
            assert a[name] == pytest.approx(b[name], abs=1e-6), (a["step"], name)
    for name, tensor in weights(cached.dir).items():
        torch.testing.assert_close(tensor, weights(online.dir)[name], atol=1e-6, rtol=0)


# --- every objective learns -----------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["ntp", "cocomix", "kd", "pause"])
def test_each_objective_lowers_validation_loss(run, objective):
    settings = {"pretrain.objective": objective, "pretrain.max_steps": 30, "pretrain.eval_every": 15}
    result = run_in(run, pretrain.run, overrides(run, **settings))
    val = rows(result.dir, "val")
    assert [r["step"] for r in val] == [0, 15, 30]
    # From ln(1024) = 6.93 nats at the start, 30 steps of 128 tokens take every objective ~0.8 nats down.
    losses = [r["val_loss"] for r in val]
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.5, val
    train = rows(result.dir, "train")
    extra = {"cocomix": "concept_loss", "kd": "kd_loss"}.get(objective)
    if extra:
        assert train[-1][extra] < train[0][extra], (train[0], train[-1])
    assert result.summary["val_ppl"] == pytest.approx(np.exp(val[-1]["val_loss"]), rel=1e-4)
    assert (result.dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(result.dir / "loss_curve.png").shape[:2] == (HEIGHT_PX, WIDTH_PX)
    assert "loss_curve_colours" not in result.summary  # the chart has a legend instead
    variant = json.loads((result.dir / "model" / "config.json").read_text())["model"]["variant"]
    assert variant == {"kd": "ntp"}.get(objective, objective)


def test_kd_loss_is_the_full_kl_when_the_top_n_holds_all_the_mass():
    torch.manual_seed(0)
    teacher_logits = torch.randn(2, 3, 6)
    student_logits = torch.randn(2, 3, 6)
    p = teacher_logits.log_softmax(-1)
    full = (p.exp() * (p - student_logits.log_softmax(-1))).sum(-1).mean()
    ids = torch.arange(6).expand(2, 3, 6)
    valid = torch.ones(2, 3, dtype=torch.bool)
    assert kd_loss(student_logits, ids, p, valid).item() == pytest.approx(full.item(), abs=1e-5)
    # With only the top 2 kept, the tail bucket makes it a lower bound of the full KL.
    top = p.topk(2, dim=-1)
    assert kd_loss(student_logits, top.indices, top.values, valid).item() <= full.item() + 1e-6


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(run, cocomix):
    def error(*args, **settings):
        result = cocomix(*cli_args(run, **settings), "pretrain", *args)
        assert result.exit_code == 2, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    assert "`pretrain.preset` ('7b') must be `tiny`, `69m`, `386m` or `1.38b`" in error(
        **{"pretrain.preset": "7b"}
    )
    assert "does not divide across 1 rank(s) x `pretrain.grad_accum` (2)" in error(
        **{"pretrain.global_batch_blocks": 5, "pretrain.grad_accum": 2}
    )
    assert "--online-teacher computes CoCoMix targets" in error(
        "--online-teacher", **{"pretrain.objective": "ntp"}
    )
    assert "`pretrain.n_concepts` (64) does not match the concept targets" in error(
        **{"pretrain.n_concepts": 64}
    )

    # kd with another vocabulary, then without cached log-probs; cocomix without any concept store.
    store = zarr.open_group(str(run / "run/extract-concepts/concepts.zarr"), mode="r+")
    store.attrs["teacher"] = {**store.attrs["teacher"], "vocab_size": 50000}
    record_digests_again(run / "run/extract-concepts", "concepts.zarr")  # an edit, not damage
    assert "the teacher has 50000 tokens, the student (the token store's tokenizer) 1024" in error(
        **{"pretrain.objective": "kd"}
    )
    shutil.rmtree(run / "run/extract-concepts")
    without_topk = {"extract.store_teacher_topk": 0}
    run_in(run, extract.run, overrides(run, **without_topk))
    message = error(**{"pretrain.objective": "kd", **without_topk})
    assert "lacks" in message and "--store-teacher-topk" in message
    assert "was made with extract.store_teacher_topk = 0, but the config now has" in error(
        **{"pretrain.objective": "kd"}
    )
    shutil.rmtree(run / "run/extract-concepts")
    message = error(**{"pretrain.objective": "cocomix"})
    assert "no finished concept store" in message and "--online-teacher" in message

    # A concept store extracted from another token store.
    run_in(run, extract.run, overrides(run))
    run_in(run, prepare.run, ["data.max_documents=90"], force=True)
    message = error(**{"pretrain.objective": "cocomix"})
    assert "`prepare` in run was made with data.max_documents = 90, but the config now has " in message
    assert "data.max_documents = 100. Rerun it with `cocomix prepare --force`" in message
    assert "was extracted from a different token store" in error(
        **{"pretrain.objective": "cocomix", "data.max_documents": 90}
    )


def record_digests_again(stage_dir: Path, name: str) -> None:
    """Record the digests of an output edited on purpose, as the stage records them when it finishes."""
    from pipelines.core import integrity
    from pipelines.core.files import atomic_write_json

    manifest = json.loads((stage_dir / "manifest.json").read_text())
    manifest["outputs"][name] = integrity.tree_digests(stage_dir / name)
    atomic_write_json(stage_dir / "manifest.json", manifest)


def first_chunk(store: Path) -> Path:
    return next(p for p in sorted((store / "train").rglob("*")) if p.is_file() and "/c/" in p.as_posix())


@pytest.mark.parametrize("store", ["prepare/tokens.zarr", "extract-concepts/concepts.zarr"])
@pytest.mark.parametrize("damage", ["four flipped bytes", "random bytes"])
def test_a_damaged_chunk_is_named_with_the_command_that_recomputes_it(run, cocomix, store, damage):
    chunk = first_chunk(run / "run" / store)
    data = bytearray(chunk.read_bytes())
    if damage == "random bytes":
        data = bytearray(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    else:
        middle = len(data) // 2
        data[middle : middle + 4] = bytes(255 - b for b in data[middle : middle + 4])
    chunk.write_bytes(bytes(data))
    result = cocomix(*cli_args(run, **{"pretrain.objective": "cocomix"}), "pretrain")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    stage = store.split("/")[0]
    assert f"error: {chunk.relative_to(run)} changed on disk since it was written" in result.stderr
    assert f"the data is damaged. Recompute it with `cocomix {stage} --force`." in result.stderr
    assert not (run / "run" / "pretrain-cocomix" / "model").exists()


def test_status_verify_names_a_damaged_file_and_the_stages_own_rerun_refuses_it(run, cocomix):
    chunk = first_chunk(run / "run" / "prepare/tokens.zarr")
    original = chunk.read_bytes()
    verified = cocomix("status", "--verify")
    assert verified.exit_code == 0, verified.stderr
    assert "verified 2 complete stages: 0 damaged files" in verified.stdout

    chunk.write_bytes(original[:10] + bytes([original[10] ^ 0x01]) + original[11:])  # one flipped bit
    verified = cocomix("status", "--verify")
    assert verified.exit_code == 1
    assert [line for line in verified.stdout.splitlines() if line.startswith("damaged: ")] == [
        f"damaged: {chunk.relative_to(run)} (sha256 differs from the one recorded, or missing); recompute it "
        "with `cocomix prepare --force`"
    ]
    as_json = cocomix("status", "--verify", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["damaged"] == {"prepare": [str(chunk.relative_to(run))]}
    rerun = cocomix("prepare")
    assert rerun.exit_code == 2 and len(rerun.stderr.strip().splitlines()) == 1, rerun.stderr
    assert rerun.stderr.startswith(
        f"error: `prepare` is complete, but {chunk.relative_to(run)} changed on disk"
    )
    assert rerun.stderr.strip().endswith("Recompute it with `cocomix prepare --force`.")

    chunk.write_bytes(original)
    assert cocomix("status", "--verify").exit_code == 0
    assert "prepare: up to date" in cocomix("prepare").stdout


def test_resume_without_a_manifest_refuses_and_keeps_the_checkpoints(run, cocomix):
    stage_dir, _, args = uninterrupted_run(run)
    killed_at(run, args, "checkpoint:step-000008:latest")
    (stage_dir / "manifest.json").unlink()
    kept = sorted(p.name for p in (stage_dir / "checkpoints").iterdir())
    result = cocomix(*args, "--resume")
    assert result.exit_code == 2, result.stderr
    assert f"{stage_dir.relative_to(run)} holds outputs but no manifest.json" in result.stderr
    assert "Pass --force to delete them" in result.stderr
    assert sorted(p.name for p in (stage_dir / "checkpoints").iterdir()) == kept
    assert conftest.stage_status(run, "pretrain-ntp") == "outputs without a manifest"


@pytest.mark.slow
def test_a_force_writer_of_a_store_being_read_is_refused_and_the_reader_ends_as_a_clean_run(run, cocomix):
    stage_dir, reference, args = uninterrupted_run(run, "cocomix")
    reader = cocomix_subprocess(args, cwd=run)
    wait_for(stage_dir / "metrics.jsonl", reader)  # training: both stores are read
    os.kill(reader.pid, signal.SIGSTOP)  # hold the reader mid-run, so the overlap is certain
    try:
        for writer in ("extract-concepts", "prepare"):
            result = cocomix(*cli_args(run), writer, "--force")
            assert result.exit_code == 2, result.stdout + result.stderr
            assert f"are being read by pid {reader.pid} (`" in result.stderr, result.stderr
            assert "pretrain" in result.stderr and "Wait for it to finish or stop it" in result.stderr
    finally:
        os.kill(reader.pid, signal.SIGCONT)
    assert reader.wait(timeout=300) == 0
    assert_bitwise_equal(weights(stage_dir), reference)


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(run):
    settings = {"pretrain.objective": "ntp", "pretrain.lr": 1e30, "pretrain.warmup_steps": 0}
    settings.update({"pretrain.save_every": 1, "pretrain.grad_clip": 0.0, "pretrain.max_steps": 20})
    with pytest.raises(
        StageError, match=r"at step (\d+)\. The last good checkpoint is .*step-0+\d+"
    ) as caught:
        run_in(run, pretrain.run, overrides(run, **settings))
    stage = run / "run/pretrain-ntp"
    latest = (stage / "checkpoints/latest").read_text().strip()
    for tensor in load_file(str(stage / "checkpoints" / latest / "model.safetensors")).values():
        assert torch.isfinite(tensor).all()
    assert latest in str(caught.value)


def test_the_loop_reads_values_back_only_at_log_eval_and_checkpoint_steps(run, monkeypatch):
    from pipelines.training.trainer import Trainer

    settings = {"pretrain.objective": "cocomix", "pretrain.log_every": 5, "pretrain.eval_every": 6}
    with ReadBacks(monkeypatch, Trainer) as recorder:
        run_in(run, pretrain.run, overrides(run, **settings, **{"pretrain.save_every": 4}))
    after_step = recorder.after_step()
    assert recorder.steps == 12
    assert set(after_step) - {0} == {4, 5, 6, 8, 10, 12}, after_step  # the steps that log, evaluate or save
    assert "trainer.py:tolist" in after_step[5]  # the logged losses, read once


def test_config_rejects_unknown_objective():
    with pytest.raises(
        ConfigError, match="`pretrain.objective` \\('mlm'\\) must be `ntp`, `cocomix`, `kd`, `pause` or `mtp`"
    ):
        load_config(None, ["pretrain.objective=mlm"])


def test_presets_in_config_match_the_model():
    from pipelines.config.schema import MODEL_PRESETS
    from pipelines.model.gpt import PRESETS

    assert MODEL_PRESETS == tuple(PRESETS)


def test_every_objective_the_config_allows_has_its_class():
    from pipelines.objectives.declaration import load_loss, registered
    from pipelines.training.objectives import Objective

    assert all(issubclass(load_loss(spec), Objective) for spec in registered().values())
    assert all(load_loss(spec).name == name for name, spec in registered().items())

"""train-sae on a tiny random teacher: it learns, resumes exactly, and rejects bad settings clearly."""

import contextlib
import json
import os
import signal
import statistics
import time
from pathlib import Path

import pytest
import torch

from pipelines.config.loading import load_config
from pipelines.errors import ConfigError
from pipelines.sae import trainer as sae_trainer
from pipelines.sae.formats import load_sae
from pipelines.stages import train_sae
from tests.conftest import (
    ReadBacks,
    assert_kills_during_the_force_clear_rerun_to_the_same_result,
    cocomix_subprocess,
    prepared_run,
    run_in,
    tiny_teacher,
)

SETTINGS = {
    "teacher.layer": 1,
    "sae.latents": 256,
    "sae.k": 4,
    "sae.train_tokens": 40960,
    "sae.batch_tokens": 512,
    "sae.buffer_tokens": 8192,
    "sae.dead_after_tokens": 8192,
    "sae.eval_every_tokens": 10240,
    "sae.eval_tokens": 2048,
    "sae.checkpoint_every_tokens": 4096,
}


def overrides(tmp_path, **extra):
    values = {"teacher.model": str(tmp_path / "teacher"), **SETTINGS, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def run_stage(directory: Path, args: list[str], **kwargs):
    return run_in(directory, train_sae.run, args, **kwargs)


@pytest.fixture
def setup(tmp_path):
    tiny_teacher(tmp_path / "teacher")
    prepared_run(tmp_path, documents=200, block_size=64)
    return tmp_path


def test_training_lowers_fvu_and_writes_a_saelens_folder_that_extract_loads(setup):
    result = run_stage(setup, overrides(setup))
    rows = [json.loads(line) for line in (setup / "run/train-sae/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 80
    assert rows[-1]["fvu"] < 0.5 and rows[-1]["fvu"] < rows[0]["fvu"] - 0.15  # training, not the tied init
    assert [r["fvu"] for r in rows] == sorted((r["fvu"] for r in rows), reverse=True)
    assert rows[-1]["l0"] == 4.0
    for key in ("loss_clean", "loss_spliced", "loss_zero_ablation", "loss_increase", "dead_fraction"):
        assert isinstance(rows[-1][key], float)
    assert rows[-1]["loss_increase"] == pytest.approx(
        rows[-1]["loss_spliced"] - rows[-1]["loss_clean"], abs=1e-5
    )
    assert result.summary["fvu"] == rows[-1]["fvu"] and result.summary["tokens"] == 40960
    loaded = load_sae(str(setup / "run/train-sae/sae"))
    assert loaded.format == "saelens" and (loaded.sae.d_in, loaded.sae.d_sae, loaded.sae.k) == (32, 256, 4)
    norms = loaded.sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert run_stage(setup, overrides(setup)).up_to_date


@pytest.mark.slow
@pytest.mark.parametrize("damage", [None, "truncated checkpoint", "torn last metrics row"])
def test_sigkill_then_resume_gives_the_same_final_weights(setup, damage):
    args = [a for o in overrides(setup) for a in ("--set", o)]
    checkpoints = setup / "run/train-sae/checkpoints"
    process = cocomix_subprocess([*args, "train-sae"], cwd=setup)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(checkpoints.glob("step-*"))) < 2:
        assert process.poll() is None, "training finished before it could be killed"
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = max(checkpoints.glob("step-*"))
    if damage == "truncated checkpoint":
        state = newest / "trainer.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "torn last metrics row":
        with open(setup / "run/train-sae/metrics.jsonl", "a") as fh:
            fh.write('{"step": 99, "loss"')
    resumed = cocomix_subprocess(["--verbose", *args, "train-sae"], cwd=setup, stderr=-1, text=True)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    if damage == "truncated checkpoint":  # the one before it is intact: the resume starts there
        assert (
            f"checkpoint {newest.relative_to(setup)} is damaged: trainer.pt does not match its digest"
            in stderr
        )
        assert "falling back to the one before it" in stderr
        assert f"resuming train-sae at step {int(newest.name[5:]) - 8} of 80" in stderr
    else:
        assert "resuming train-sae at step" in stderr

    (setup / "clean").mkdir()
    tiny_teacher(setup / "clean" / "teacher")
    prepared_run(setup / "clean", documents=200, block_size=64)
    run_stage(setup / "clean", overrides(setup))
    a, b = (
        load_sae(str(setup / "run/train-sae/sae")).sae,
        load_sae(str(setup / "clean/run/train-sae/sae")).sae,
    )
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    rows = (setup / "run/train-sae/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 20, 40, 60, 80]


def test_bad_settings_are_clear_errors(setup, cocomix):
    def error(*extra):
        result = cocomix(*[a for o in overrides(setup, **dict(extra)) for a in ("--set", o)], "train-sae")
        assert result.exit_code == 2, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        return result.stderr

    assert "`sae.k` (512) must not exceed `sae.latents` (256)" in error(("sae.k", 512))
    assert "`teacher.layer` (9) is out of range" in error(("teacher.layer", 9))
    message = error(("sae.train_tokens", 10_000_000))
    assert (
        "The token store has" in message
        and "training tokens: `sae.train_tokens` (10,000,000, in whole batches) exceeds them" in message
    )
    assert "`sae.buffer_tokens` (9,999,872) exceeds them" in error(("sae.buffer_tokens", 9_999_872))

    assert run_stage(setup, overrides(setup)).summary["latents"] == 256
    tiny_teacher(setup / "teacher", n_embd=48)  # the teacher changed since the run started
    changed = error()
    assert (
        "holds a complete `train-sae` of a different run (file:" in changed and "model.safetensors" in changed
    )

    long_blocks = ["--set", "data.block_size=256"]
    assert cocomix(*long_blocks, "prepare", "--force").exit_code == 0  # the teacher reads 128 positions
    args = [a for o in overrides(setup, **{"data.block_size": 256}) for a in ("--set", o)]
    result = cocomix(*args, "train-sae", "--force")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "`data.block_size` (256) is longer than the context of teacher" in result.stderr
    assert "Set `data.block_size` to at most 128 and run `cocomix prepare --force`." in result.stderr


def test_retraining_with_unchanged_settings_leaves_the_extraction_up_to_date(setup):
    from pipelines.stages import extract

    run_stage(setup, overrides(setup))
    extract_settings = overrides(setup, **{"extract.blocks_per_chunk": 64, "extract.tokens_per_batch": 1024})
    first = run_in(setup, extract.run, extract_settings)
    assert not first.up_to_date
    weights = (setup / "run/train-sae/sae/sae_weights.safetensors").read_bytes()
    assert not run_stage(setup, overrides(setup), force=True).up_to_date  # trained again, same weights
    assert (setup / "run/train-sae/sae/sae_weights.safetensors").read_bytes() == weights
    again = run_in(setup, extract.run, extract_settings)
    assert again.up_to_date


@pytest.mark.slow
def test_a_kill_at_each_step_of_the_force_clear_then_a_rerun_gives_the_same_sae(setup):
    run_stage(setup, overrides(setup))
    args = [*[a for o in overrides(setup) for a in ("--set", o)], "train-sae"]

    def sae_files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((setup / "run/train-sae/sae").iterdir())}

    def same_files(result, reference):
        assert result == reference

    assert_kills_during_the_force_clear_rerun_to_the_same_result(
        setup, args, "train-sae", sae_files, same_files
    )


def test_k_larger_than_width_is_a_config_error():
    with pytest.raises(ConfigError, match=r"`sae.k` \(64\) must not exceed `sae.latents` \(32\)"):
        load_config(None, ["sae.latents=32", "sae.k=64"])


def test_auxk_loss_equals_openais_formula_and_only_trains_dead_latents():
    """Parity with openai/sparse_autoencoder: masked pre-activations, top aux_k, ReLU, normalized MSE."""
    torch.manual_seed(0)
    n, c, d, aux_k = 16, 24, 8, 5
    pre = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    W_dec = torch.nn.functional.normalize(torch.randn(c, d, dtype=torch.float64), dim=-1).requires_grad_(True)
    b_dec = torch.randn(d, dtype=torch.float64)
    residual = torch.randn(n, d, dtype=torch.float64)
    dead = torch.zeros(c, dtype=torch.bool)
    dead[[1, 4, 5, 9, 13, 17, 20, 23]] = True

    ours = sae_trainer.auxk_loss(pre, residual, dead, aux_k, W_dec)
    (grad_pre, grad_dec) = torch.autograd.grad(ours, (pre, W_dec))

    values, ids = (pre * dead).topk(aux_k, dim=-1)  # OpenAI's auxk_mask_fn, then topk
    recon = torch.einsum("nk,nkd->nd", values.relu(), W_dec[ids]) + b_dec
    target = residual + b_dec
    reference = (recon - target).pow(2).mean() / (target.mean(0) - target).pow(2).mean()
    (ref_pre, ref_dec) = torch.autograd.grad(reference, (pre, W_dec))

    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(grad_pre, ref_pre, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_dec, ref_dec, rtol=1e-10, atol=1e-12)
    assert grad_pre[:, ~dead].abs().max() == 0 and grad_dec[~dead].abs().max() == 0


# Latents die here within the run: 512 latents, k=2 and a high learning rate on the tiny teacher, with a
# dead window of 8 steps (measured: a third of the latents dead at the end without a remedy).
DYING = {
    "sae.latents": 512,
    "sae.k": 2,
    "sae.lr": 1e-2,
    "sae.dead_after_tokens": 4096,
    "sae.eval_every_tokens": 8192,
}


def test_the_default_dead_latent_method_lowers_the_dead_fraction_against_off(setup):
    from pipelines.config.schema import SaeConfig

    default = SaeConfig().dead_latents
    assert default != "off"
    final = {}
    for method in ("off", default):
        run_stage(setup, overrides(setup, **DYING, **{"sae.dead_latents": method}), force=True)
        rows = [json.loads(line) for line in (setup / "run/train-sae/metrics.jsonl").read_text().splitlines()]
        final[method] = rows[-1]
    assert final["off"]["dead_fraction"] > 0.2  # the setting does what it is for
    assert final[default]["dead_fraction"] < 0.75 * final["off"]["dead_fraction"], final
    if default == "resample":
        assert final["off"]["resampled"] == 0 and final[default]["resampled"] > 0


@contextlib.contextmanager
def trainer_of(setup: Path, **settings):
    """A `SaeTrainer` on the prepared run, restored to step 0 (its pre-bias at the first buffer's mean)."""
    from pipelines.concepts.teacher import load_teacher_for
    from pipelines.data.token_store import open_prepared_tokens

    cfg = run_in(setup, lambda cfg, progress: cfg, overrides(setup, **settings))
    with contextlib.ExitStack() as reading:
        store, _ = open_prepared_tokens(reading, setup / cfg.run.dir)
        teacher = load_teacher_for(cfg.teacher, torch.device("cpu"), store.attrs)
        (setup / "stage").mkdir()
        trainer = sae_trainer.SaeTrainer(cfg, teacher, store, setup / "stage", torch.device("cpu"))
        trainer.restore(resume=False)
        yield trainer


def test_resampling_restarts_dead_latents_towards_poorly_reconstructed_inputs(setup):
    """One event by hand: dead latents restart on poorly reconstructed inputs of the pool, their Adam
    moments are zeroed, and the rest of the SAE and of the optimizer state is untouched."""
    with trainer_of(setup, **DYING, **{"sae.dead_latents": "resample"}) as trainer:
        check_one_resampling_event(trainer, trainer.s)


def test_the_loop_reads_values_back_only_at_evaluations_and_resampling_checks(setup, monkeypatch):
    with ReadBacks(monkeypatch, sae_trainer.SaeTrainer) as recorder:
        run_stage(setup, overrides(setup))
    assert recorder.steps == 80
    # Evaluations every 20 steps; the dead latents counted at every resampling event (every 16 steps); the
    # state copied to the host for each checkpoint (every 8 steps).
    checkpoints = set(range(8, 80, 8))
    assert set(recorder.after_step()) - {0} == {20, 40, 60, 80} | checkpoints, recorder.after_step()


def test_the_auxk_loop_reads_values_back_only_at_evaluations(setup, monkeypatch):
    """AuxK with latents dying: the step takes its dead latents' top k on the device, never counting them on
    the host, so the loop waits only where it logs."""
    with ReadBacks(monkeypatch, sae_trainer.SaeTrainer) as recorder:
        run_stage(setup, overrides(setup, **DYING, **{"sae.dead_latents": "auxk"}))
    assert recorder.steps == 80
    evaluations, checkpoints = {16, 32, 48, 64, 80}, set(range(8, 80, 8))
    assert set(recorder.after_step()) - {0} == evaluations | checkpoints, recorder.after_step()
    rows = [json.loads(line) for line in (setup / "run/train-sae/metrics.jsonl").read_text().splitlines()]
    assert any(row["aux_loss"] > 0 for row in rows[1:])  # latents died and AuxK trained them


def test_tokens_per_s_counts_training_steps_only(setup, monkeypatch):
    """Evaluation and checkpoint writing, made 0.5 s and 0.2 s slower, stay out of each window's tokens/s: it
    is within 10% of the window's tokens over the time its steps took, measured around each step in the same
    run (a ratio, robust on a loaded machine). The summary's is the median of the windows."""
    advance, evaluate, save = (
        getattr(sae_trainer.SaeTrainer, name) for name in ("_advance", "evaluate", "_save_checkpoint")
    )
    step_seconds = []

    def timed_advance(trainer):
        started = time.monotonic()
        losses = advance(trainer)
        step_seconds.append(time.monotonic() - started)
        return losses

    def slow_evaluate(trainer):
        time.sleep(0.5)
        return evaluate(trainer)

    def slow_save(trainer):
        time.sleep(0.2)
        save(trainer)

    monkeypatch.setattr(sae_trainer.SaeTrainer, "_advance", timed_advance)
    monkeypatch.setattr(sae_trainer.SaeTrainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(sae_trainer.SaeTrainer, "_save_checkpoint", slow_save)
    result = run_stage(setup, overrides(setup))
    rows = [json.loads(line) for line in (setup / "run/train-sae/metrics.jsonl").read_text().splitlines()]
    windows = [row for row in rows if row["tokens_per_s"] is not None]
    assert [row["step"] for row in windows] == [20, 40, 60, 80]  # 20 steps of 512 tokens each
    for row in windows:
        trained = 20 * 512 / sum(step_seconds[row["step"] - 20 : row["step"]])
        assert row["tokens_per_s"] == pytest.approx(trained, rel=0.1), (row["step"], trained)
    assert result.summary["tokens_per_s"] == round(statistics.median(r["tokens_per_s"] for r in windows), 1)


@pytest.mark.parametrize("dead_latents", ["resample", "auxk"])
def test_the_sparse_top_k_backward_gives_the_dense_gradients(setup, dead_latents):
    """The training step's top-k values, recomputed from the k encoder columns chosen, are the dense
    product's, and so are the gradients of every parameter (the AuxK term's included)."""
    with trainer_of(setup, **{"sae.dead_latents": dead_latents, "sae.aux_coef": 0.5}) as trainer:
        sae, x = trainer.sae, trainer._batch(0)
        with torch.no_grad():
            sae.b_enc.normal_()  # so that no term hides behind a zero
        dead = torch.zeros(sae.d_sae, dtype=torch.bool)
        dead[::3] = True

        def loss_and_grads(encode):
            sae.zero_grad(set_to_none=True)
            pre, ids, values, recon = encode()
            loss = (x - recon).pow(2).sum(-1).mean()
            if dead_latents == "auxk":
                loss = loss + 0.5 * sae_trainer.auxk_loss(pre, (x - recon).detach(), dead, 16, sae.W_dec)
            loss.backward()
            return ids, values, recon, {name: p.grad.clone() for name, p in sae.named_parameters()}

        def dense():
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            values, ids = pre.topk(sae.k, dim=-1)
            values = values.relu()
            return pre, ids, values, torch.einsum("nk,nkd->nd", values, sae.W_dec[ids]) + sae.b_dec

        sparse = loss_and_grads(lambda: trainer._encode_decode(x, dense_pre_grad=dead_latents == "auxk"))
        reference = loss_and_grads(dense)
        assert torch.equal(sparse[0], reference[0])
        torch.testing.assert_close(sparse[1], reference[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sparse[2], reference[2], rtol=1e-5, atol=1e-6)
        for name, grad in reference[3].items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(sparse[3][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def check_one_resampling_event(trainer, settings):
    def dead_latents():
        return trainer.tokens_since_fired >= settings.dead_after_tokens

    while not (trainer._resample_due() and bool(dead_latents().any())):  # train up to the first event
        assert trainer.step < 4 * trainer.window_steps, "no latent died"
        trainer._train_step(trainer._batch(trainer.step))
        trainer.step += 1
    dead = dead_latents()
    assert 0 < int(dead.sum()) < settings.latents
    sae = trainer.sae
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {
        name: {m: trainer.optimizer.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")}
        for name, p in sae.named_parameters()
    }
    pool = trainer._buffer_activations(trainer.step // trainer.steps_per_buffer)
    outlier = 7
    with torch.no_grad():  # before the event
        pool[outlier] *= 50  # in place, in the buffer: an input the SAE reconstructs far worse than any
        _, _, top_k_values, recon = trainer._encode_decode(pool)
        top_k_mean, errors = top_k_values.mean(-1), (pool - recon).pow(2).sum(-1)
    assert errors[outlier] > 100 * errors.median()

    assert trainer.resample_dead_latents() == int(dead.sum()) == trainer.resampled
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=-1), torch.ones(int(dead.sum())))
    directions = torch.nn.functional.normalize(pool - before["b_dec"], dim=-1)
    # every restarted decoder row is the unit direction (from b_dec) of one input of the pool, its source
    match = (sae.W_dec[dead] @ directions.t()).max(-1)
    assert match.values.min() > 1 - 1e-5
    sources = match.indices
    # the encoder column points the same way, and on its source the latent's pre-activation is the mean of
    # the source's k largest, so that it enters the top k there
    torch.testing.assert_close(
        torch.nn.functional.normalize(sae.W_enc[:, dead].t(), dim=-1), sae.W_dec[dead], rtol=0, atol=1e-5
    )
    pre_on_source = ((pool[sources] - sae.b_dec) * sae.W_enc[:, dead].t()).sum(-1) + sae.b_enc[dead]
    torch.testing.assert_close(pre_on_source, top_k_mean[sources], rtol=1e-4, atol=1e-5)
    # drawn in proportion to the squared error: the outlier is one of the sources
    assert outlier in sources.tolist()
    assert bool((sae.b_enc[dead] == 0).all()) and bool((trainer.tokens_since_fired[dead] == 0).all())
    restarted = {"W_dec": dead, "W_enc": (slice(None), dead), "b_enc": dead, "b_dec": slice(0, 0)}
    for name, param in sae.named_parameters():
        index = restarted[name]
        kept = before[name].clone()
        kept[index] = param.detach()[index]
        assert torch.equal(param.detach(), kept), f"{name} changed outside the dead latents"
        for moment, value in moments[name].items():
            expected = value.clone()
            expected[index] = 0
            assert torch.equal(trainer.optimizer.state[param][moment], expected), (name, moment)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["train-sae resampled", "train-sae checkpoint after resampling"])
def test_a_kill_across_a_resampling_event_then_resume_gives_the_same_final_weights(setup, kill_at):
    """Killed right after an event (the newest checkpoint predates it: the resume replays it), or right
    after the first checkpoint that holds restarted latents (the resume must carry them and their moments)."""
    settings = {
        **DYING,
        "sae.dead_latents": "resample",
        "sae.train_tokens": 20480,
        "sae.checkpoint_every_tokens": 1536,
    }
    args = [a for o in overrides(setup, **settings) for a in ("--set", o)]
    env = {**os.environ, "COCOMIX_KILL_AT": kill_at}
    killed = cocomix_subprocess([*args, "train-sae"], cwd=setup, env=env)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    newest = max((setup / "run/train-sae/checkpoints").glob("step-*"))
    checkpoint = torch.load(newest / "trainer.pt", weights_only=True)
    # killed after the first event: the newest checkpoint is from before it, and the resume replays it;
    # killed after the first checkpoint that follows an event: the resume starts from the restarted latents
    assert (checkpoint["resampled"] > 0) == (kill_at == "train-sae checkpoint after resampling")
    resumed = cocomix_subprocess(["--verbose", *args, "train-sae"], cwd=setup, stderr=-1, text=True)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resuming train-sae at step {checkpoint['step']} of 40" in stderr

    (setup / "clean").mkdir()
    tiny_teacher(setup / "clean" / "teacher")
    prepared_run(setup / "clean", documents=200, block_size=64)
    clean = run_stage(setup / "clean", overrides(setup, **settings))
    assert clean.summary["resampled"] > 0
    a = load_sae(str(setup / "run/train-sae/sae")).sae
    b = load_sae(str(setup / "clean/run/train-sae/sae")).sae
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name

    def rows(run: Path) -> list[dict]:
        lines = (run / "train-sae/metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert rows(setup / "run") == rows(setup / "clean/run")


# --- SAE families and `sae.architecture` ----------------------------------------------------------------


def test_the_architecture_key_changes_no_fingerprint_of_a_topk_run(setup, monkeypatch):
    """`sae.architecture` is left out of train-sae's inputs at `topk`: the fingerprint is the one computed at
    296d566, before the key existed, so a train-sae finished then stays complete; naming `topk` explicitly
    is the same run."""
    from pipelines.core import stage_inputs
    from pipelines.core.fingerprints import fingerprint

    monkeypatch.chdir(setup / "teacher")  # no cocomix.toml: the built-in defaults
    settings = ["sae.latents=256", "sae.k=4", "teacher.model=gpt2"]
    for extra in ([], ["sae.architecture=topk"]):
        inputs = stage_inputs.train_sae(load_config(None, [*settings, *extra]))
        assert "sae.architecture" not in inputs
        assert fingerprint(inputs) == "c425d2b7bb835e2e"  # 296d566's

    first = run_stage(setup, overrides(setup))
    manifest = json.loads((setup / "run/train-sae/manifest.json").read_text())
    assert "sae.architecture" not in manifest["inputs"] and manifest["status"] == "complete"
    again = run_stage(setup, overrides(setup, **{"sae.architecture": "topk"}))
    assert again.up_to_date and again.fingerprint == first.fingerprint


def test_an_unknown_or_untrainable_architecture_is_one_line_listing_the_families(setup, cocomix):
    for name in ("gated", "relu"):
        args = [a for o in overrides(setup, **{"sae.architecture": name}) for a in ("--set", o)]
        result = cocomix(*args, "train-sae")
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert (
            f"`sae.architecture` ('{name}') must be an SAE family `train-sae` trains: `topk`" in result.stderr
        )
        assert "register yours in `pipelines/sae/families.py`" in result.stderr


# --- stopping on a signal -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_resume_gives_the_same_sae(setup, cocomix):
    """SIGTERM finishes the step, saves a checkpoint and exits 0 with the command that continues; a stage
    folder holding an older cocomix's `checkpoint.pt` is one line naming `--force`; the resume ends with
    the weights of a run never stopped."""
    args = [a for o in overrides(setup) for a in ("--set", o)]
    checkpoints = setup / "run/train-sae/checkpoints"
    process = cocomix_subprocess([*args, "train-sae"], cwd=setup, stdout=-1, stderr=-1, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(checkpoints.glob("step-*")):
        assert process.poll() is None, "training finished before it could be stopped"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert (
        "train-sae: stopped by SIGTERM after step" in stdout and "Continue with `cocomix train-sae" in stdout
    )
    stopped_at = int((checkpoints / "latest").read_text().strip().removeprefix("step-"))
    assert 8 <= stopped_at < 80 and f"after step {stopped_at};" in stdout
    assert json.loads((setup / "run/train-sae/manifest.json").read_text())["status"] == "running"

    legacy = setup / "run/train-sae/checkpoint.pt"
    legacy.write_bytes(b"an older cocomix's resume state")
    refused = cocomix(*args, "train-sae")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "checkpoint.pt is the resume state of an older cocomix" in refused.stderr
    assert "Run `cocomix train-sae --force`" in refused.stderr
    legacy.unlink()

    resumed = cocomix_subprocess(["--verbose", *args, "train-sae"], cwd=setup, stderr=-1, text=True)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resuming train-sae at step {stopped_at} of 80" in stderr
    assert not checkpoints.exists()  # a finished stage keeps its SAE only

    (setup / "clean").mkdir()
    tiny_teacher(setup / "clean" / "teacher")
    prepared_run(setup / "clean", documents=200, block_size=64)
    run_stage(setup / "clean", overrides(setup))
    a = load_sae(str(setup / "run/train-sae/sae")).sae
    b = load_sae(str(setup / "clean/run/train-sae/sae")).sae
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    rows = (setup / "run/train-sae/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 20, 40, 60, 80]

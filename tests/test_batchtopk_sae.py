"""BatchTopK: the batch's N k largest activations kept in training (SAELens' formula), a threshold that
follows the smallest kept one, saved as SAELens saves it (a `jumprelu` folder), and trained by `train-sae`."""

import json
import os
import signal

import pytest
import torch

from pipelines.errors import StageError
from pipelines.sae.batchtopk_sae import THRESHOLD_LR, BatchTopKSAE
from pipelines.sae.formats import load_sae, save_saelens
from pipelines.sae.jumprelu_sae import JumpReLUSAE
from tests.conftest import cocomix_subprocess, prepared_run, run_in
from tests.test_train_sae import overrides, run_stage, setup  # noqa: F401  (`setup` is a fixture)


def random_batchtopk(d_in: int = 16, d_sae: int = 64, k: int = 4) -> BatchTopKSAE:
    torch.manual_seed(0)
    sae = BatchTopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0.0, 0.3)
    return sae


def saelens_batch_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """SAELens' `BatchTopK.forward` (sae_lens/saes/batchtopk_sae.py), as written there."""
    acts = x.relu()
    flat_acts = acts.flatten()
    num_samples = acts.shape[:-1].numel()
    acts_topk_flat = torch.topk(flat_acts, int(k * num_samples), dim=-1)
    return (
        torch.zeros_like(flat_acts)
        .scatter(-1, acts_topk_flat.indices, acts_topk_flat.values)
        .reshape(acts.shape)
    )


def test_training_keeps_the_batchs_n_k_largest_activations_as_saelens_does():
    sae = random_batchtopk()
    x = torch.randn(32, 16)
    code = sae.train_encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    reference = saelens_batch_topk(pre, sae.k).detach()
    assert code.values.shape == code.ids.shape == (32 * 4,) and bool((code.values > 0).all())
    # each kept value at its (token, latent) gives SAELens' activations exactly
    tokens = torch.arange(32)[:, None].expand(32, 64).flatten()[pre.relu().flatten().topk(32 * 4).indices]
    ours = torch.zeros(32, 64).index_put((tokens, code.ids), code.values.detach())
    assert torch.equal(ours, reference)
    per_token = (reference > 0).sum(-1)
    assert per_token.sum() == 32 * 4 and per_token.min() < 4 < per_token.max()  # k on average only
    torch.testing.assert_close(code.recon, reference @ sae.W_dec + sae.b_dec)


def test_the_threshold_follows_saelens_rule_then_the_mean_smallest_kept_activation_at_the_end():
    sae = random_batchtopk()
    first = sae.train_encode(torch.randn(32, 16))
    sae.observe_training_batch(first)
    assert sae.threshold.dtype == torch.float64
    assert sae.threshold.item() == pytest.approx(THRESHOLD_LR * first.values.min().item(), rel=1e-12)
    second = sae.train_encode(torch.randn(32, 16) * 3)
    sae.observe_training_batch(second)
    expected = (1 - THRESHOLD_LR) * THRESHOLD_LR * first.values.min().double()
    expected += THRESHOLD_LR * second.values.min().double()
    assert sae.threshold.item() == pytest.approx(expected.item(), rel=1e-12)
    batches = [torch.randn(32, 16) for _ in range(3)]
    sae.end_training(iter(batches))  # Bussmann et al.: the mean of the batches' smallest kept activation
    mean = sum(sae.train_encode(x).values.min().double() for x in batches) / 3
    assert sae.threshold.item() == pytest.approx(mean.item(), rel=1e-12)
    # inference: JumpReLU at the threshold, every latent alike
    x = torch.randn(8, 16)
    pre = sae.pre_activation(sae.prepare_input(x)[0])
    assert torch.equal(sae.encode(x), pre.relu() * (pre > sae.threshold))


def test_it_is_saved_as_saelens_saves_a_batchtopk_sae_and_loads_back_as_jumprelu(tmp_path):
    sae = random_batchtopk()
    sae.observe_training_batch(sae.train_encode(torch.randn(32, 16)))
    save_saelens(sae, tmp_path / "sae", {"model_name": "teacher"})
    config = json.loads((tmp_path / "sae/cfg.json").read_text())
    # SAELens' `save_inference_model`: JumpReLUSAEConfig's fields, architecture `jumprelu`
    saelens_keys = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input"}
    saelens_keys |= {"normalize_activations", "reshape_activations", "metadata"}
    assert saelens_keys <= set(config) and config["architecture"] == "jumprelu"
    assert (config["d_in"], config["d_sae"], config["normalize_activations"]) == (16, 64, "layer_norm")
    loaded = load_sae(str(tmp_path / "sae"))
    assert isinstance(loaded.sae, JumpReLUSAE) and loaded.sae.k_per_token is None
    assert torch.equal(loaded.sae.threshold, torch.full((64,), sae.threshold.item(), dtype=torch.float32))
    x = torch.randn(64, 16)
    with torch.no_grad():
        assert torch.equal(loaded.sae.encode(x) > 0, sae.encode(x) > 0)
        torch.testing.assert_close(loaded.sae(x), sae(x), rtol=0, atol=1e-6)


def test_train_sae_trains_a_batchtopk_sae_that_extract_reads(setup):  # noqa: F811
    from pipelines.stages import extract

    topk = run_stage(setup, overrides(setup))
    with pytest.raises(StageError) as refused:
        run_stage(setup, overrides(setup, **{"sae.architecture": "batchtopk"}))
    assert "sae.architecture: <unset> -> batchtopk" in str(refused.value)  # another run than the topk one

    result = run_stage(setup, overrides(setup, **{"sae.architecture": "batchtopk"}), force=True)
    assert result.fingerprint != topk.fingerprint and result.summary["architecture"] == "batchtopk"
    manifest = json.loads((setup / "run/train-sae/manifest.json").read_text())
    assert manifest["inputs"]["sae.architecture"] == "batchtopk"
    rows = [json.loads(line) for line in (setup / "run/train-sae/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < 0.5 and rows[-1]["fvu"] < rows[0]["fvu"] - 0.15
    assert 2 <= rows[-1]["l0"] <= 8  # k = 4 on average in training; the threshold gives about as many
    loaded = load_sae(str(setup / "run/train-sae/sae"))
    assert loaded.sae.architecture == "jumprelu" and loaded.sae.threshold.unique().numel() == 1
    settings = overrides(setup, **{"sae.architecture": "batchtopk", "extract.tokens_per_batch": 1024})
    concepts = run_in(setup, extract.run, settings)
    assert not concepts.up_to_date


@pytest.mark.slow
def test_a_killed_batchtopk_run_resumes_to_the_same_sae_and_threshold(setup):  # noqa: F811
    """The threshold is state of the family's own (a buffer): a run killed after a checkpoint resumes it
    from there and ends with the weights and threshold of a run never killed."""
    settings = overrides(setup, **{"sae.architecture": "batchtopk"})
    args = [a for o in settings for a in ("--set", o)]
    env = {**os.environ, "COCOMIX_KILL_AT": "checkpoint:step-000016:latest"}
    killed = cocomix_subprocess([*args, "train-sae"], cwd=setup, env=env)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    resumed = cocomix_subprocess(["--verbose", *args, "train-sae"], cwd=setup, stderr=-1, text=True)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming train-sae at step 16 of 80" in stderr, stderr

    (setup / "clean").mkdir()
    prepared_run(setup / "clean", documents=200, block_size=64)
    run_stage(setup / "clean", settings)
    a = load_sae(str(setup / "run/train-sae/sae")).sae
    b = load_sae(str(setup / "clean/run/train-sae/sae")).sae
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name

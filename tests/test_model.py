"""The student: exact CoCoMix math, causality, KV-cache generation, save/load, HF export, counts."""

import pytest
import torch
import torch.nn.functional as F

from pipelines.model import gpt
from pipelines.model.checkpoint import load_model, save_model
from pipelines.model.generation import generate
from pipelines.model.gpt import GPT, ConceptIntervention, normalize_features
from pipelines.model.hf_export import export_hf_gpt2
from pipelines.training.objectives import concept_loss
from tests.conftest import tiny_model_config

VARIANTS = [
    dict(variant="ntp"),
    dict(variant="cocomix"),
    dict(variant="cocomix", mixing="add"),
    dict(variant="pause"),
]
IDS = ["ntp", "cocomix", "cocomix-add", "pause"]


def build(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = GPT(tiny_model_config(**overrides)).to(dtype).eval()
    # Random biases and norms too, so that no term of the math hides behind a zero or a one.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or name.endswith("pre_bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def tokens(batch=2, length=20, seed=1, vocab=97):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", VARIANTS, ids=IDS)
def test_causality(overrides):
    model = build(**overrides)
    idx = tokens()
    t = 9
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
    before, after = model(idx), model(changed)
    assert torch.allclose(before.logits[:, : t + 1], after.logits[:, : t + 1], atol=1e-12, rtol=0)
    assert not torch.allclose(before.logits[:, t + 1 :], after.logits[:, t + 1 :])
    if overrides["variant"] == "cocomix":
        assert torch.allclose(
            before.concept_logits[:, : t + 1], after.concept_logits[:, : t + 1], atol=1e-12, rtol=0
        )
        assert not torch.allclose(before.concept_logits[:, t + 1 :], after.concept_logits[:, t + 1 :])


STEERING = [ConceptIntervention((3, 17), scale=8.0), ConceptIntervention((5,), value=40.0)]
GENERATION_CASES = [(o, None) for o in VARIANTS] + [(dict(variant="cocomix"), i) for i in STEERING]
GENERATION_IDS = IDS + ["cocomix-scale", "cocomix-value"]


@pytest.mark.parametrize("overrides, intervention", GENERATION_CASES, ids=GENERATION_IDS)
def test_cached_generation_equals_uncached(overrides, intervention):
    model = build(**overrides)
    prompt = tokens(batch=2, length=7)
    cached = generate(model, prompt, 32, temperature=0, intervention=intervention)
    uncached = generate(model, prompt, 32, temperature=0, intervention=intervention, use_cache=False)
    assert cached.shape == (2, 39)
    assert torch.equal(cached, uncached)
    sampled = generate(
        model, prompt, 32, temperature=0.9, top_k=20, top_p=0.9, seed=3, intervention=intervention
    )
    assert torch.equal(
        sampled,
        generate(
            model,
            prompt,
            32,
            temperature=0.9,
            top_k=20,
            top_p=0.9,
            seed=3,
            intervention=intervention,
            use_cache=False,
        ),
    )


def test_cached_logits_match_uncached_at_every_step():
    model = build(variant="cocomix")
    idx = tokens(batch=1, length=24)
    full = model(idx)
    cache = model.new_kv_cache()
    pieces = [model(idx[:, :10], kv_cache=cache)] + [
        model(idx[:, i : i + 1], kv_cache=cache) for i in range(10, 24)
    ]
    stepped = torch.cat([p.logits for p in pieces], dim=1)
    assert model.tokens_in(cache) == 24
    assert cache.layers[0].length == 24 and cache.layers[-1].length == 48  # two slots above the insert layer
    assert torch.allclose(stepped, full.logits, atol=1e-10)


def test_intervention_scale_one_is_a_no_op_and_a_large_value_steers():
    model = build(variant="cocomix")
    prompt = tokens(batch=1, length=6)
    plain = generate(model, prompt, 16, temperature=0.8, seed=5)
    assert torch.equal(
        plain,
        generate(
            model, prompt, 16, temperature=0.8, seed=5, intervention=ConceptIntervention((1, 2), scale=1.0)
        ),
    )
    out = model(prompt)
    steered = model(prompt, intervention=ConceptIntervention((11,), value=1e3))
    assert torch.equal(out.concept_logits, steered.concept_logits)  # reported before the intervention
    assert not torch.allclose(out.logits, steered.logits)


def test_sparse_compression_equals_the_dense_product_with_gradients():
    model = build(variant="cocomix", dtype=torch.float32, n_concepts=512, concept_k=32)
    branch = model.concepts
    logits = torch.randn(3, 11, 512, requires_grad=True)
    values, ids = logits.topk(32, dim=-1)
    sparse = branch.compress_sparse(values, ids)
    kept_dense = torch.zeros_like(logits).scatter(-1, ids, values)
    dense = kept_dense @ branch.compress_weight + branch.compress_bias  # the official code's dense product
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    grad_sparse = torch.autograd.grad(
        sparse.square().sum(), (logits, branch.compress_weight), retain_graph=True
    )
    grad_dense = torch.autograd.grad(dense.square().sum(), (logits, branch.compress_weight))
    for a, b in zip(grad_sparse, grad_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_concept_branch_against_a_naive_implementation():
    """concept_k = C and mixing "add": every logit is kept, so the branch is algebra to check by hand."""
    model = build(variant="cocomix", mixing="add", n_concepts=16, concept_k=16)
    idx = tokens(batch=1, length=5)
    c = model.concepts
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(5))
        for block in model.h[:2]:
            x = block(x)
        mixed = torch.empty_like(x)
        for t in range(5):
            h = x[0, t]
            mean = sum(h.tolist()) / len(h)
            std = (sum((v - mean) ** 2 for v in h.tolist()) / (len(h) - 1)) ** 0.5  # unbiased
            normalized = (h - mean) / (std + 1e-5) - c.pre_bias
            concept_logits = c.concept_head.weight @ normalized + c.concept_head.bias
            compressed = c.compress_weight.t() @ concept_logits + c.compress_bias + c.pre_bias
            mixed[0, t] = h + (compressed * std + mean)
        for block in model.h[2:]:
            mixed = block(mixed)
        expected = model.ln_f(mixed) @ model.wte.weight.t()
        torch.testing.assert_close(model(idx).logits, expected, atol=1e-10, rtol=1e-10)


def test_normalize_features_matches_the_official_formula():
    h = torch.randn(4, 7, dtype=torch.float64)
    x, mean, std = normalize_features(h, 1e-5)
    torch.testing.assert_close(std.squeeze(-1), h.std(dim=-1))
    torch.testing.assert_close(x, (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-5))


def test_concept_loss_is_the_official_mean_of_k_cross_entropies_over_valid_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 50)
    targets = torch.randint(0, 50, (2, 6, 4))
    everywhere = torch.ones(2, 6, dtype=torch.bool)
    official = sum(
        torch.nn.functional.cross_entropy(logits.view(-1, 50), targets[..., i].reshape(-1)) / 4
        for i in range(4)
    )
    torch.testing.assert_close(concept_loss(logits, targets, everywhere), official)
    valid = everywhere.clone()
    valid[:, -1] = False
    changed = logits.clone()
    changed[:, -1] = 100 * torch.randn(2, 50)
    assert torch.equal(concept_loss(logits, targets, valid), concept_loss(changed, targets, valid))
    torch.testing.assert_close(
        concept_loss(logits, targets, valid),
        concept_loss(logits[:, :-1], targets[:, :-1], everywhere[:, :-1]),
    )


@pytest.mark.parametrize("overrides", VARIANTS, ids=IDS)
def test_save_load_round_trip_is_exact(tmp_path, overrides):
    model = build(dtype=torch.float32, **overrides)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config
    idx = tokens()
    assert torch.equal(model(idx).logits, loaded(idx).logits)


def test_ntp_exports_to_transformers_gpt2_with_equal_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(dtype=torch.float32, variant="ntp")
    export_hf_gpt2(model, tmp_path / "hf", separator_id=7)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (7, 7)  # inside the vocabulary
    idx = tokens()
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(idx).logits
    assert (ours - theirs).abs().max() < 1e-5
    with pytest.raises(ValueError, match="only NTP models export"):
        export_hf_gpt2(build(variant="cocomix"), tmp_path / "no")


def test_context_length_is_enforced():
    model = build(variant="cocomix")
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        generate(model, tokens(batch=1, length=60), 10)


@pytest.mark.parametrize("overrides", VARIANTS, ids=IDS)
def test_bf16_autocast_forward_and_backward(overrides):
    model = build(dtype=torch.float32, **overrides).train()
    idx = tokens()
    reference = model(idx).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
        loss = out.logits.float().logsumexp(-1).mean()
        if out.concept_logits is not None:
            loss = loss + concept_loss(
                out.concept_logits,
                torch.zeros(2, 20, 4, dtype=torch.long),
                torch.ones(2, 20, dtype=torch.bool),
            )
    loss.backward()
    assert (out.logits.float() - reference).abs().max() < 0.05
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def loss_and_grads(model, idx, targets):
    """NTP loss (+ 0.1 x the concept loss for CoCoMix) and the gradient of every parameter."""
    from pipelines.training.objectives import next_token_loss

    model.zero_grad(set_to_none=True)
    out = model(idx)
    loss = next_token_loss(out.logits, idx)
    if out.concept_logits is not None:
        loss = loss + 0.1 * concept_loss(out.concept_logits, targets, torch.ones_like(idx, dtype=torch.bool))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", VARIANTS, ids=IDS)
def test_padded_attention_heads_give_the_same_loss_and_gradients(monkeypatch, overrides):
    """Head dim 78, as the 69M preset's: padded to 80 (as on CUDA), the math is the unpadded one."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append(q.shape[-1])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = build(dtype=torch.float32, n_embd=156, n_head=2, **overrides).train()
    idx = tokens(length=24)
    targets = torch.randint(0, 64, (2, 24, 4), generator=torch.Generator().manual_seed(2))
    loss, grads = loss_and_grads(model, idx, targets)
    assert set(seen) == {78}
    seen.clear()
    monkeypatch.setitem(gpt.HEAD_DIM_MULTIPLE, "cpu", 8)
    padded_loss, padded_grads = loss_and_grads(model, idx, targets)
    assert set(seen) == {80}
    torch.testing.assert_close(padded_loss, loss, atol=1e-6, rtol=1e-6)
    assert padded_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # With a cache the heads keep their size (transformers' cache shares it): the logits still agree.
    cache = model.new_kv_cache()
    with torch.no_grad():
        cached = torch.cat(
            [model(idx[:, :10], kv_cache=cache).logits, model(idx[:, 10:], kv_cache=cache).logits], 1
        )
        torch.testing.assert_close(cached, model(idx).logits, atol=1e-5, rtol=1e-5)

"""The objective's loss as the module that trains: eager and compiled, padded heads or not, the same math."""

import numpy as np
import pytest
import torch

from pipelines.config.loading import load_config
from pipelines.model import gpt
from pipelines.model.gpt import GPT
from pipelines.training.objectives import ObjectiveLoss, host_tensors, objective_for
from tests.conftest import tiny_model_config


def loss_and_grads(module, model, tokens, inputs):
    model.zero_grad(set_to_none=True)
    loss, parts = module(tokens, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach() for name, value in parts.items()}, grads


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ntp", "cocomix"])
def test_the_compiled_loss_with_padded_heads_equals_the_eager_one(monkeypatch, objective):
    """What a GPU run does (the loss compiled with the model, heads of 78 padded to 80) against the plain
    eager model and loss on the CPU: each student's loss parts and every gradient."""
    cfg = load_config(None, [f"pretrain.objective={objective}", "pretrain.lam_concept=0.5"])
    torch.manual_seed(0)
    model = GPT(tiny_model_config(variant=objective, n_embd=156, n_head=2, n_layer=3, insert_layer=1))
    loss = ObjectiveLoss(model, objective_for(cfg), autocast=None)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 24), generator=generator)
    valid = torch.rand(2, 24, generator=generator) > 0.2
    inputs = {"concept_ids": torch.randint(0, 64, (2, 24, 4), generator=generator), "valid": valid}
    eager_parts, eager_grads = loss_and_grads(loss, model, tokens, inputs)
    parts = {"ntp": {"loss", "ntp_loss"}, "cocomix": {"loss", "ntp_loss", "concept_loss"}}[objective]
    assert set(eager_parts) == parts

    monkeypatch.setitem(gpt.HEAD_DIM_MULTIPLE, "cpu", 8)
    parts, grads = loss_and_grads(torch.compile(loss), model, tokens, inputs)
    for name, value in eager_parts.items():
        torch.testing.assert_close(parts[name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_host_tensors_type_the_stored_arrays_for_the_losses():
    batch = {
        "tokens": np.array([[1, 65535]], dtype=np.uint16),
        "concept_scores": np.array([[0.5, -1.25]], dtype=np.float16),
        "valid": np.array([[True, False]]),
    }
    tensors = host_tensors(batch)
    assert [tensors[n].dtype for n in batch] == [torch.int64, torch.float32, torch.bool]
    assert tensors["tokens"].tolist() == [[1, 65535]] and tensors["concept_scores"].tolist() == [[0.5, -1.25]]
    assert not any(t.is_pinned() for t in tensors.values())

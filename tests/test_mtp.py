"""Multi-token prediction (`pretrain.objective = "mtp"`): its loss is the cross-entropy two tokens ahead, its
head trains and resumes with the student (bitwise after a kill) and is left out of the exported model."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipelines.config.loading import load_config
from pipelines.model.checkpoint import load_model
from pipelines.model.gpt import GPT
from pipelines.stages import pretrain
from pipelines.training.mtp import future_token_loss
from pipelines.training.objectives import ObjectiveLoss, objective_for
from pipelines.training.state import Checkpoints
from tests import conftest
from tests.conftest import cocomix_subprocess, prepared_run, tiny_model_config

STUDENT = [
    "pretrain.objective=mtp",
    "pretrain.mtp_coef=0.5",
    "pretrain.preset=tiny",
    "pretrain.n_layer=2",
    "pretrain.n_head=2",
    "pretrain.n_embd=32",
    "pretrain.batch_blocks=4",
    "pretrain.max_steps=8",
    "pretrain.warmup_steps=2",
    "pretrain.lr=3e-3",
    "pretrain.eval_every=4",
    "pretrain.save_every=4",
    "pretrain.log_every=1",
]


def test_the_loss_two_tokens_ahead_is_the_cross_entropy_against_token_t_plus_2():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    expected = F.cross_entropy(logits[:, :4].reshape(-1, 11), tokens[:, 2:].reshape(-1))
    assert torch.allclose(future_token_loss(logits, tokens, 2), expected)


def test_the_mtp_loss_is_ntp_plus_its_weight_times_the_head_s_loss(tmp_path):
    cfg = load_config(None, ["pretrain.objective=mtp", "pretrain.mtp_coef=0.25"])
    objective = objective_for(cfg)
    torch.manual_seed(0)
    student = GPT(tiny_model_config(variant="ntp"))
    student.add_module("objective_heads", torch.nn.ModuleDict(objective.heads(student)))
    tokens = torch.randint(0, student.config.vocab_size, (2, 16))
    loss, parts = ObjectiveLoss(student, objective, autocast=None)(tokens, {})
    assert torch.allclose(loss, parts["ntp_loss"] + 0.25 * parts["mtp_loss"])
    loss.backward()  # the head and the shared unembedding learn from the t+2 loss
    assert student.objective_heads["mtp"].mlp.c_fc.weight.grad.abs().sum() > 0


def test_mtp_resumes_bitwise_after_a_kill_and_exports_the_student_alone(tmp_path):
    prepared_run(tmp_path, documents=60)
    straight = conftest.run_in(tmp_path, pretrain.run, STUDENT)
    stage_dir = tmp_path / straight.dir
    reference = load_file(str(stage_dir / "model" / "model.safetensors"))
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["inputs"]["pretrain.mtp_coef"] == 0.5
    assert manifest["summary"]["val_mtp_loss"] > manifest["summary"]["val_loss"] > 0  # t+2 is harder
    # The exported student is the plain NTP model: no head, and it loads as one.
    assert not [name for name in reference if "objective_heads" in name]
    assert load_model(stage_dir / "model").config.variant == "ntp"
    # The checkpoints hold the head, so that a resumed run continues it.
    _, state, _ = Checkpoints(stage_dir, keep_last=2).load_newest_intact()
    assert "objective_heads.mtp.attn.c_attn.weight" in state

    shutil.rmtree(stage_dir)
    args = [arg for setting in STUDENT for arg in ("--set", setting)] + ["--no-progress", "pretrain"]
    env = {**os.environ, "COCOMIX_KILL_AT": "checkpoint:step-000004:latest"}
    killed = cocomix_subprocess(args, cwd=tmp_path, env=env)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    resumed = cocomix_subprocess([*args, "--resume"], cwd=tmp_path)
    assert resumed.wait(timeout=300) == 0
    resumed_weights = load_file(str(stage_dir / "model" / "model.safetensors"))
    assert sorted(resumed_weights) == sorted(reference)
    assert all(torch.equal(resumed_weights[name], reference[name]) for name in reference)


@pytest.mark.parametrize("coef", ["-0.1", "nan"])
def test_a_bad_mtp_coef_is_one_error_line(tmp_path, coef):
    from tests.cli.test_bad_input import assert_one_line_error
    from tests.conftest import Cocomix

    result = Cocomix(tmp_path)("pretrain", "--objective", "mtp", "--set", f"pretrain.mtp_coef={coef}")
    assert_one_line_error(result, f"--set pretrain.mtp_coef={coef}: `pretrain.mtp_coef`")

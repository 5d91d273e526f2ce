"""Parameter counts against the paper's sizes and against the real modules; FLOPs against torch's counter;
the GPU peaks that MFU divides by."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipelines.model.flops import (
    forward_flops_per_token,
    parameter_counts,
    peak_flops,
    train_flops_per_token,
)
from pipelines.model.gpt import GPT, preset
from tests.conftest import tiny_model_config

PAPER_SIZES = {"69m": 69e6, "386m": 386e6, "1.38b": 1.38e9}


@pytest.mark.parametrize("overrides", [dict(variant="ntp"), dict(variant="cocomix"), dict(variant="pause")])
def test_analytic_counts_equal_the_modules(overrides):
    config = tiny_model_config(**overrides)
    model = GPT(config)
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if config.variant == "cocomix":
        unused_rows = (config.n_concepts - config.concept_k) * config.n_embd
        assert counts["active"] == counts["total"] - unused_rows


def test_paper_presets_match_the_paper_sizes(capsys):
    rows = []
    for size, nominal in PAPER_SIZES.items():
        ntp = parameter_counts(preset(size, "ntp"))["total"]
        cocomix = parameter_counts(preset(size, "cocomix"))
        rows.append((size, ntp, cocomix["active"], cocomix["total"]))
        assert abs(ntp - nominal) / nominal < 0.01, (size, ntp)
        # The CoCoMix width is chosen so that its active count (compression at k rows) matches the size.
        assert abs(cocomix["active"] - nominal) / nominal < 0.015, (size, cocomix)
    with capsys.disabled():
        print("\nsize    NTP total   CoCoMix active   CoCoMix total")
        for size, ntp, active, total in rows:
            print(f"{size:<6} {ntp / 1e6:>10.2f}M {active / 1e6:>15.2f}M {total / 1e6:>14.2f}M")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(variant="ntp"),
        dict(variant="cocomix"),
        dict(variant="cocomix", mixing="add"),
        dict(variant="pause"),
    ],
)
def test_analytic_flops_match_torch_flop_counter(overrides):
    config = tiny_model_config(**overrides, n_concepts=256, concept_k=8)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 48))
    # The math backend decomposes attention into counted matmuls (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(idx)
    counted_per_token = counter.get_total_flops() / idx.numel()
    analytic = forward_flops_per_token(config, seq_len=48)
    # torch counts matmuls and attention only: the sparse compression (an embedding-bag) is not a matmul.
    if config.variant == "cocomix":
        analytic -= 2 * config.concept_k * config.n_embd
    assert counted_per_token == pytest.approx(analytic, rel=1e-9)
    assert train_flops_per_token(config, 48) == 3 * forward_flops_per_token(config, 48)


def test_interleaving_costs_more_than_ntp_at_equal_width():
    ntp, cocomix, pause = (preset("69m", v, n_embd=512) for v in ("ntp", "cocomix", "pause"))
    assert (
        forward_flops_per_token(ntp, 1024)
        < forward_flops_per_token(pause, 1024)
        < forward_flops_per_token(cocomix, 1024)
    )


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),  # SXM5
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989.4),  # SXM
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100-PCIE-40GB", 312),
        ("NVIDIA A10G", 125),
        ("NVIDIA L40S", 362),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA GH200 480GB", None),  # not an H200
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None),  # a slice of the GPU
    ],
)
def test_the_dense_bf16_peak_of_each_gpu_by_the_name_torch_reports(monkeypatch, name, tflops):
    """PCIe and NVL cards are not taken for the SXM modules of their chip; an unknown GPU has no peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda") == (None if tflops is None else pytest.approx(tflops * 1e12))
    assert peak_flops("cpu") is None

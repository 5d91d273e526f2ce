"""Parameter counts and analytic FLOPs per token for the three variants, for reporting and MFU.

FLOPs count a multiply-add as 2. Per slot and block: 24 D^2 for the projections and MLP, plus 4 D S for
attention scores and their weighted sum over S slots (the PaLM convention: no causal halving). CoCoMix and
pause run the blocks from `insert_layer` on over two slots per token (S = 2T); CoCoMix adds its concept head
(2 D C) and the sparse compression (2 k D). Training is 3x the forward (backward = 2x forward). MFU is
those FLOPs per second over the GPU's dense bf16 peak, as nanoGPT, llm.c and torchtitan report it.
"""

from __future__ import annotations

import re

from pipelines.model.gpt import ModelConfig

# Dense bf16 tensor-core peak FLOP/s per GPU: NVIDIA's datasheets give it with 2:4 sparsity, halved here.
# Keyed by the model, plus "PCIe" or "NVL" where the device's name says so: those cards ("NVIDIA H100 PCIe",
# "NVIDIA H100 NVL") run the chip of the SXM module ("NVIDIA H100 80GB HBM3", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB") at lower clocks, and a match on a part of the name would take them for it.
# Any other device reports no MFU rather than a guess.
PEAK_FLOPS = {
    "H100": 989.4e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989.4e12,
    "H200 NVL": 835e12,
    "A100": 312e12,
    "A100 PCIe": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
}
_FORM_FACTORS = ("PCIE", "NVL")


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """`total` parameters, and `active`: the compression layer counted at its k used rows, as the paper."""
    d, layers = config.n_embd, config.n_layer
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = config.vocab_size * d + config.context_length * d + layers * block + 2 * d
    active = total
    if config.variant == "cocomix":
        head = d * config.n_concepts + config.n_concepts
        compress = config.n_concepts * d + d
        total += d + head + compress  # + pre_bias
        active += d + head + config.concept_k * d + d
    elif config.variant == "pause":
        total += d
        active += d
    return {"total": total, "active": active}


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per input token for a sequence of `seq_len` tokens."""
    d = config.n_embd
    slots_after = 2 if config.doubles_length else 1
    blocks_before = config.insert_layer if config.variant != "ntp" else config.n_layer
    blocks_after = config.n_layer - blocks_before

    def block_flops(slots_per_token: int) -> float:
        attended = slots_per_token * seq_len
        return slots_per_token * (24 * d * d + 4 * d * attended)

    flops = blocks_before * block_flops(1) + blocks_after * block_flops(slots_after)
    flops += 2 * d * config.vocab_size  # tied LM head
    if config.variant == "cocomix":
        flops += 2 * d * config.n_concepts + 2 * config.concept_k * d
    return float(flops)


def train_flops_per_token(config: ModelConfig, seq_len: int, extra_forward: float = 0.0) -> float:
    """Forward and backward FLOPs per token, with `extra_forward` FLOPs per token of training-only heads."""
    return 3.0 * (forward_flops_per_token(config, seq_len) + extra_forward)


def peak_flops(device) -> float | None:
    """The dense bf16 peak of a CUDA `device` whose name `PEAK_FLOPS` knows; None for any other."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name: str) -> float | None:
    """The dense bf16 peak of the GPU that `torch.cuda.get_device_name` calls `name`; None for any other."""
    words = re.split(r"[\s-]+", name.upper())  # "NVIDIA A100-PCIE-40GB", "NVIDIA H100 80GB HBM3"
    if "MIG" in words:  # a slice of a GPU ("... MIG 1g.10gb") has a fraction of its peak
        return None
    forms = [word for word in words if word in _FORM_FACTORS]
    keys = {key.upper(): flops for key, flops in PEAK_FLOPS.items()}
    return next((keys[key] for word in words if (key := " ".join([word, *forms])) in keys), None)


def mfu(
    config: ModelConfig,
    seq_len: int,
    tokens_per_s: float,
    device,
    devices: int = 1,
    extra_forward: float = 0.0,
) -> float | None:
    """Model FLOPs utilisation of `devices` GPUs training at `tokens_per_s`, counting `extra_forward` FLOPs
    per token of an objective's training-only heads (`ObjectiveSpec.extra_flops`); None off a known GPU."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return train_flops_per_token(config, seq_len, extra_forward) * tokens_per_s / (peak * devices)

"""Input normalisation shared by every SAE architecture: the values SAELens' `normalize_activations` may take
that cocomix reads, and OpenAI's `LN`, which SAELens' `layer_norm` reproduces."""

from __future__ import annotations

import torch

from pipelines.errors import InputError

NORMALIZATIONS = ("none", "layer_norm")


def check_normalization(normalize: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise InputError(
            f"SAE input normalisation {normalize!r} is not supported; use one of {NORMALIZATIONS}."
        )


def normalize_input(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenAI's `LN`: centre, divide by (unbiased std + eps); returns (normalised, mean, std)."""
    mean = x.mean(dim=-1, keepdim=True)
    centered = x - mean
    std = centered.std(dim=-1, keepdim=True)
    return centered / (std + eps), mean, std

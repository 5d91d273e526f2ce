"""Choosing the torch device from a config value."""

from __future__ import annotations


def resolve_device(spec: str):
    """`auto` is CUDA when present, else CPU; anything else is passed to `torch.device`."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)

"""Choosing the torch device from a config value."""

from __future__ import annotations

from pipelines.errors import ConfigError


def resolve_device(spec: str, setting: str = "device"):
    """`auto` is CUDA when present, else CPU; anything else is passed to `torch.device`, and a CUDA device
    this machine lacks is one line naming `setting` (the config key or flag that chose it), before any
    work, rather than a CUDA error in the middle of a stage."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"`{setting}` is `{spec}`: choose auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"`{setting}` is `{spec}`, but PyTorch sees no CUDA GPU on this machine (torch "
                f"{torch.__version__}). Use `auto` or `cpu`, or run on a GPU node."
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"`{setting}` is `{spec}`, but this machine has {count} CUDA GPU(s), cuda:0 to "
                f"cuda:{count - 1}."
            )
    return device

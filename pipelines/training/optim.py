"""AdamW and the learning-rate schedule of `pretrain` (the official code's nanoGPT settings).

AdamW with betas (0.9, 0.95), eps 1e-8 and weight decay; optionally without decay on LayerNorm weights,
biases and embeddings (one-dimensional tensors and the embedding tables). Linear warmup to the peak, then a
cosine to `min_lr_ratio` x peak at `max_steps`. The schedule is a pure function of the step, so a resumed
run needs no scheduler state beyond the step it stopped at.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.config.schema import PretrainConfig

BETAS = (0.9, 0.95)
EPS = 1e-8


def learning_rate(step: int, p: PretrainConfig) -> float:
    """The learning rate for optimiser step `step` (0-based)."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    min_lr = p.lr * p.min_lr_ratio
    span = max(1, p.max_steps - p.warmup_steps)
    progress = min(1.0, (step - p.warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (p.lr - min_lr)


def build_optimizer(model: nn.Module, p: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the (unwrapped) model's parameters, in a decayed and optionally a non-decayed group."""
    params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if p.decay_norms_and_embeddings:
        groups = [{"params": [param for _, param in params], "weight_decay": p.weight_decay}]
    else:
        decayed = [param for name, param in params if param.dim() >= 2 and not _is_embedding(name)]
        kept = [param for name, param in params if param.dim() < 2 or _is_embedding(name)]
        groups = [
            {"params": decayed, "weight_decay": p.weight_decay},
            {"params": kept, "weight_decay": 0.0},
        ]
    # fused AdamW is the fast path on CUDA; on CPU the default (foreach) implementation is used.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=p.lr, betas=BETAS, eps=EPS, fused=fused or None)


def _is_embedding(name: str) -> bool:
    return name in ("wte.weight", "wpe.weight")

"""Gao et al.'s AuxK loss, which trains dead latents to reconstruct what the live ones miss
(`sae.dead_latents = "auxk"`); `pipelines.sae.trainer` adds it to the loss of each step."""

from __future__ import annotations


def auxk_loss(pre, residual, dead, aux_k: int, W_dec):
    """Gao et al.'s AuxK: reconstruct the (detached) residual from each token's top `aux_k` dead latents;
    0 while none is dead.

    pre (N, C) pre-activations, residual (N, d) = x - reconstruction, dead (C,) bool, W_dec (C, d). The
    squared error is normalised by the residual's variance, as OpenAI's `normalized_mse`. The top `aux_k` are
    taken however many are dead, so that the host never waits to count them: where fewer are dead, the rest
    are live latents at -inf, whose ReLU weight 0 adds 0 to the sum and to every gradient (the CPU kernel may
    then add up a dead row's gradient terms in another order: equal up to rounding).
    """
    import torch  # lazily, as in the trainer: importing the stage must not load torch
    import torch.nn.functional as F

    dead_pre = pre.masked_fill(~dead, float("-inf"))
    values, ids = dead_pre.topk(min(aux_k, pre.shape[-1]), dim=-1)
    recon = F.embedding_bag(ids, W_dec, per_sample_weights=values.relu(), mode="sum")
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return torch.where(dead.any(), (residual - recon).pow(2).sum(-1).mean() / variance, 0.0)

"""Concept targets: which SAE latents matter most for predicting the next token.

`official` (the paper's code): score = (g . W_dec[latent]) * TopK activation, which is zero outside the k
active latents, so it is computed over those k only (k decoder rows gathered per token, never the dense
(tokens x C) product). `paper` (Eq. 1 as written): the same with the dense pre-activation over all C latents.
Targets are the top `K` latents by signed score. A dense `official` top-K would pick arbitrary inactive
latents (score 0) when fewer than K active ones score >= 0; here targets always come from the active latents.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from pipelines.config.schema import Attribution
from pipelines.sae.topk import TopKSAE

ATTRIBUTIONS = typing.get_args(Attribution)
# Gathered decoder rows per slice: (tokens x k x d_in) floats, bounded to keep memory flat.
_GATHER_BUDGET = 1 << 24


@dataclass
class ConceptTargets:
    ids: torch.Tensor
    """(N, K) latent ids, best first."""
    scores: torch.Tensor
    """(N, K) their attribution scores."""
    sae_values: torch.Tensor
    """(N, k) the SAE's TopK activations (for the concept dictionary)."""
    sae_ids: torch.Tensor
    """(N, k) their latent ids."""


def concept_targets(
    sae: TopKSAE, hidden: torch.Tensor, grad: torch.Tensor, top_k: int, attribution: str
) -> ConceptTargets:
    """Targets for N tokens from their hidden states (N, d_in) and loss gradients (N, d_in)."""
    encoding = sae.encode_topk(hidden)
    if attribution == "official":
        scores = official_scores(sae, grad, encoding.values, encoding.ids)
        best = scores.topk(top_k, dim=-1)
        ids = encoding.ids.gather(-1, best.indices)
        return ConceptTargets(ids, best.values, encoding.values, encoding.ids)
    if attribution == "paper":
        dense = paper_scores(sae, hidden, grad)
        best = dense.topk(top_k, dim=-1)
        return ConceptTargets(best.indices, best.values, encoding.values, encoding.ids)
    raise ValueError(f"unknown attribution {attribution!r}; choose from {ATTRIBUTIONS}")


def official_scores(
    sae: TopKSAE, grad: torch.Tensor, values: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """(N, k): (g . W_dec[id]) * activation for each token's k active latents."""
    n, k = ids.shape
    step = max(1, _GATHER_BUDGET // (k * sae.d_in))
    parts = []
    for start in range(0, n, step):
        rows = sae.W_dec[ids[start : start + step]]  # (n', k, d_in)
        parts.append(torch.einsum("nkd,nd->nk", rows, grad[start : start + step]))
    return torch.cat(parts) * values


def paper_scores(sae: TopKSAE, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(N, C): pre-activation * (g @ W_dec^T) over every latent, as Eq. 1 states."""
    pre = sae.pre_activation(sae.prepare_input(hidden)[0])
    return pre * (grad @ sae.W_dec.t())

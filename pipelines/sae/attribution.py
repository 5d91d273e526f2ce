"""Concept targets: which SAE latents matter most for predicting the next token.

`official` (the paper's code): score = (g . W_dec[latent]) * activation, which is zero outside the active
latents. `paper` (Eq. 1 as written): the same with the dense pre-activation over all C latents. Targets are
the top `K` latents by signed score.

SAEs with a fixed k per token (`k_per_token`, TopK): the k latents of the TopK are the active ones, so
`official` is computed over those k only (k decoder rows gathered per token, never the dense (tokens x C)
product), and targets always come from them, whatever their activation (a dense top-K would pick arbitrary
inactive latents, score 0, when fewer than K of the k score >= 0). Every token has targets.

Other SAEs (ReLU, JumpReLU): how many latents are active (activation non-zero) varies by token, so the work is
dense, in slices of about `_DENSE_BUDGET` (tokens x C) floats to keep memory flat. `official` targets are the
top-K attributions among the active latents. A token with n < K active latents fills the remaining slots by
repeating its active latents in attribution order (ids a b c -> a b c a for K = 4): the concept loss is the
mean of the K slots' cross-entropies, so each active latent keeps (as nearly as K allows) an equal share, as
if the token had exactly its n targets; repeating only the best one would weight it (K - n + 1) times. A token
with no active latent has no concept: `has_active` is False, `extract-concepts` and the online teacher mark it
invalid, so the concept loss skips it as it skips a block's last position (ids and scores are 0). `paper`
scores every latent as for TopK SAEs; validity follows the same no-active rule.

The SAE activations stored for the concept dictionary (`stored_sae_width` per token): the k of a TopK SAE;
for other SAEs the `DENSE_STORED_LATENTS` largest activations (at least K, at most C), zero-padded where
fewer are active, the padded slots repeating the active ids as targets do, so that any reader taking the
first K slots by activation gets the same kind of fill.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from pipelines.config.schema import Attribution
from pipelines.sae.base import SparseAutoencoder as SAE

ATTRIBUTIONS = typing.get_args(Attribution)
# Gathered decoder rows per slice: (tokens x k x d_in) floats, bounded to keep memory flat.
_GATHER_BUDGET = 1 << 24
# Dense (tokens x d_sae) floats per slice for SAEs without a fixed k; a few such arrays are alive at once.
_DENSE_BUDGET = 1 << 22
DENSE_STORED_LATENTS = 64
"""Activations stored per token (`extract.store_sae_topk`) for an SAE without a fixed k."""


@dataclass
class ConceptTargets:
    ids: torch.Tensor
    """(N, K) latent ids, best first."""
    scores: torch.Tensor
    """(N, K) their attribution scores."""
    sae_values: torch.Tensor
    """(N, W) the SAE's largest activations (for the concept dictionary), W = `stored_sae_width`."""
    sae_ids: torch.Tensor
    """(N, W) their latent ids."""
    has_active: torch.Tensor
    """(N,) bool: the token has an active latent; a token without one carries no concept target."""


def stored_sae_width(sae: SAE, top_k: int) -> int:
    """SAE activations stored per token: the k of a TopK SAE, else a fixed width (module docstring)."""
    if sae.k_per_token is not None:
        return sae.k_per_token
    return min(sae.d_sae, max(DENSE_STORED_LATENTS, top_k))


def concept_targets(
    sae: SAE, hidden: torch.Tensor, grad: torch.Tensor, top_k: int, attribution: str
) -> ConceptTargets:
    """Targets for N tokens from their hidden states (N, d_in) and loss gradients (N, d_in)."""
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"unknown attribution {attribution!r}; choose from {ATTRIBUTIONS}")
    if sae.k_per_token is not None:
        return _topk_targets(sae, hidden, grad, top_k, attribution)
    step = max(1, _DENSE_BUDGET // sae.d_sae)
    width = stored_sae_width(sae, top_k)
    parts = [
        _dense_targets(
            sae, hidden[start : start + step], grad[start : start + step], top_k, attribution, width
        )
        for start in range(0, hidden.shape[0], step)
    ]
    return ConceptTargets(*(torch.cat(column) for column in zip(*parts, strict=True)))


def _topk_targets(
    sae: SAE, hidden: torch.Tensor, grad: torch.Tensor, top_k: int, attribution: str
) -> ConceptTargets:
    encoding = sae.encode_active(hidden)
    every = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    if attribution == "official":
        scores = official_scores(sae, grad, encoding.values, encoding.ids)
        best = scores.topk(top_k, dim=-1)
        ids = encoding.ids.gather(-1, best.indices)
        return ConceptTargets(ids, best.values, encoding.values, encoding.ids, every)
    dense = paper_scores(sae, hidden, grad)
    best = dense.topk(top_k, dim=-1)
    return ConceptTargets(best.indices, best.values, encoding.values, encoding.ids, every)


def _dense_targets(sae, hidden, grad, top_k: int, attribution: str, width: int) -> tuple[torch.Tensor, ...]:
    """One slice of `concept_targets` for an SAE whose activations are computed densely (n, C)."""
    pre = sae.pre_activation(sae.prepare_input(hidden)[0])
    acts = sae.activate(pre)
    active = acts != 0
    n_active = active.sum(-1)
    along_grad = grad @ sae.W_dec.t()  # (n, C): g . W_dec[latent] for every latent
    if attribution == "official":
        best = (acts * along_grad).masked_fill(~active, float("-inf")).topk(top_k, dim=-1)
        ids, scores = _repeat_active(best.indices, n_active), _repeat_active(best.values, n_active)
    else:
        best = (pre * along_grad).topk(top_k, dim=-1)
        ids, scores = best.indices, best.values
    has_active = n_active > 0
    ids, scores = ids * has_active[:, None], scores.masked_fill(~has_active[:, None], 0.0)
    stored = acts.topk(width, dim=-1)  # activations are >= 0, so the active ones come first
    stored_ids = _repeat_active(stored.indices, n_active) * has_active[:, None]
    return ids, scores, stored.values, stored_ids, has_active


def _repeat_active(ranked: torch.Tensor, n_active: torch.Tensor) -> torch.Tensor:
    """(n, K) `ranked` with slot j >= n_active taking slot j mod n_active: the active entries repeated."""
    slots = torch.arange(ranked.shape[-1], device=ranked.device)
    return ranked.gather(-1, slots % n_active.clamp(min=1)[:, None])


def official_scores(sae: SAE, grad: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, k): (g . W_dec[id]) * activation for each token's k active latents."""
    n, k = ids.shape
    step = max(1, _GATHER_BUDGET // (k * sae.d_in))
    parts = []
    for start in range(0, n, step):
        rows = sae.W_dec[ids[start : start + step]]  # (n', k, d_in)
        parts.append(torch.einsum("nkd,nd->nk", rows, grad[start : start + step]))
    return torch.cat(parts) * values


def paper_scores(sae: SAE, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(N, C): pre-activation * (g @ W_dec^T) over every latent, as Eq. 1 states."""
    pre = sae.pre_activation(sae.prepare_input(hidden)[0])
    return pre * (grad @ sae.W_dec.t())

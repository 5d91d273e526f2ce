"""The losses of `pretrain`: next-token prediction, CoCoMix's concept loss, and KD on cached top-N log-probs.

KD approximation: the cache keeps the teacher's N most likely next tokens per position. The teacher's
distribution is taken as those N probabilities plus one "tail" bucket holding the rest of the mass
(1 - sum of the N); the student's distribution is folded the same way (its probabilities of the same N ids,
plus everything else in the tail). KL(teacher || student) over these N + 1 buckets is exact when the
teacher's tail is zero and a lower bound of the full-vocabulary KL otherwise (merging outcomes never
increases a KL divergence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.model.gpt import concept_loss

__all__ = ["concept_loss", "kd_loss", "next_token_loss", "online_concept_targets"]


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next token; (B, T, V) and (B, T)."""
    # Shift the labels rather than the logits: slicing (B, T, V) would copy it.
    labels = F.pad(tokens[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def kd_loss(
    logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over valid positions of KL(teacher || student) on the top-N ids plus a tail bucket.

    logits (B, T, V); teacher_ids and teacher_log_probs (B, T, N); valid (B, T) bool.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, teacher_ids.long())  # (B, T, N)
    log_p_top = teacher_log_probs.float()
    # Tails as log(1 - sum of the N probabilities); clamped because float16 caches can round past 1.
    lse_p = torch.logsumexp(log_p_top, dim=-1).clamp(max=-1e-6)
    lse_q = torch.logsumexp(log_q_top, dim=-1).clamp(max=-1e-6)
    log_p_tail, log_q_tail = _log1mexp(lse_p), _log1mexp(lse_q)
    kl_top = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
    kl_tail = log_p_tail.exp() * (log_p_tail - log_q_tail)
    mask = valid.to(kl_top.dtype)
    return ((kl_top + kl_tail) * mask).sum() / mask.sum().clamp(min=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def online_concept_targets(teacher, sae, tokens: torch.Tensor, top_k: int, attribution: str):
    """CoCoMix targets computed now by the teacher and SAE, as `extract-concepts` caches them.

    Returns ids (B, T, K) and valid (B, T): the last position of a block has no next token.
    """
    from pipelines.sae.attribution import concept_targets

    out = teacher.hidden_and_grad(tokens)
    B, T, D = out.hidden.shape
    with torch.no_grad():
        targets = concept_targets(
            sae, out.hidden.float().reshape(B * T, D), out.grad.float().reshape(B * T, D), top_k, attribution
        )
    valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
    valid[:, -1] = False
    return targets.ids.reshape(B, T, -1), valid

"""Sampling from a student with a KV cache, optionally with a concept intervention (the steering hook).

The cache holds one entry per token below the insert layer and two above it (token and concept or pause
slot); positions count tokens. Cached and uncached decoding give the same tokens, which the tests check.
"""

from __future__ import annotations

import torch

from pipelines.model.gpt import GPT, ConceptIntervention


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    intervention: ConceptIntervention | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Prompt (T,) or (B, T) -> the prompt followed by `max_new_tokens` sampled tokens.

    `temperature=0` decodes greedily. `top_k` and `top_p` filter the distribution before sampling; the
    `seed` fixes the draws, so the same call gives the same text.
    """
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids.unsqueeze(0) if squeeze else prompt_ids
    if ids.size(1) + max_new_tokens > model.config.context_length:
        raise ValueError(
            f"prompt ({ids.size(1)}) + max_new_tokens ({max_new_tokens}) exceeds the context length "
            f"{model.config.context_length}"
        )
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    cache = model.new_kv_cache() if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input, kv_cache=cache, intervention=intervention).logits[:, -1]
        next_id = sample_next_token(logits.float(), temperature, top_k, top_p, generator)
        ids = torch.cat([ids, next_id], dim=1)
        step_input = next_id if use_cache else ids
    model.train(was_training)
    return ids[0] if squeeze else ids


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """One next-token id per row of `logits` (B, V): greedy at temperature 0, else sampled after top-k and
    top-p filtering. Shared by the student's `generate` and the teacher's steering loop, so both sample
    alike from the same seed."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first is always kept).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)

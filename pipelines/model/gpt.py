"""The student: a GPT-2 style decoder, its CoCoMix concept branch, and the pause-token baseline.

One class, three variants chosen by `ModelConfig.variant`:
- `ntp`: the plain decoder (learned positions, pre-LayerNorm, tanh-GELU MLP, tied embeddings).
- `cocomix`: before block `insert_layer` the hidden state predicts concept logits; the top `concept_k` are
  compressed into one continuous concept per token, which is interleaved with the token states
  (h_1, c_1, h_2, c_2, ...) for the remaining blocks, or added to them (`mixing = "add"`), or not mixed in at
  all (`mixing = "none"`: concept prediction alone, the paper's Fig. 6 ablation). The LM head reads the
  concept slots, so c_t predicts token t+1. The math follows the paper's official code exactly.
- `pause`: the same interleaving with one learned pause vector instead of a concept (paper Fig. 6f).

Positions are embedded once, per token, before any block: interleaved slots get no position of their own,
so a KV cache counts tokens, not slots. (Measured against the official `GPT2CoCoMixLMHeadModel` under
transformers 4.44.2: its `generate(use_cache=True)` with eager attention is correct; a hand-written cached
loop that passes no position ids goes wrong only with insert layer 0, whose cache holds two slots per token;
its SDPA path is wrong in cached steps, where `is_causal=True` aligns the mask top-left when there are fewer
queries than keys. Ours builds a bottom-right causal mask in cached steps and counts positions by token.)
Shapes in comments: B batch, T tokens, S slots (T or 2T), C concepts, D model width.

This file imports only torch and the standard library: `cocomix export` copies it as it is into every
exported folder, where transformers' `trust_remote_code` runs it without cocomix installed (see
`modeling_cocomix.py`). So the model math has one implementation, the one cocomix trains and evaluates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("ntp", "cocomix", "pause")
# The values of `pipelines.config.schema.Mixing` (a test keeps the two equal): this file imports no cocomix.
MIXINGS = ("interleave", "add", "none")


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "ntp"
    """`ntp`, `cocomix` or `pause`."""
    vocab_size: int = 50257
    """Token vocabulary (GPT-2's by default)."""
    context_length: int = 1024
    """Most tokens the model reads (its learned position table)."""
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    insert_layer: int = 3
    """Index of the block before which concepts (or pauses) are mixed in."""
    n_concepts: int = 32768
    """C: the SAE's width, i.e. how many concepts the head predicts."""
    concept_k: int = 32
    """How many of the largest concept logits are kept and compressed."""
    mixing: str = "interleave"
    """`interleave` (the paper), `add` (h_t + c_t) or `none` (concepts predicted, not mixed in): ablations."""
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    concept_norm_eps: float = 1e-5
    """Added to the std in the concept branch's parameter-free normalisation."""

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is not one of {VARIANTS}")
        if self.mixing not in MIXINGS:
            problems.append(f"mixing {self.mixing!r} is not one of {MIXINGS}")
        if self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.variant != "ntp" and not 0 <= self.insert_layer < self.n_layer:
            problems.append(f"insert_layer ({self.insert_layer}) must be in [0, n_layer={self.n_layer})")
        if self.variant == "cocomix" and not 1 <= self.concept_k <= self.n_concepts:
            problems.append(f"concept_k ({self.concept_k}) must be in [1, n_concepts={self.n_concepts}]")
        if self.variant == "pause" and self.mixing != "interleave":
            problems.append("the pause model only interleaves (mixing = 'interleave')")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def doubles_length(self) -> bool:
        """True when blocks from `insert_layer` on see two slots per token."""
        return self.variant == "pause" or (self.variant == "cocomix" and self.mixing == "interleave")

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values)


# The paper's sizes: NTP and pause use the NTP width; CoCoMix a smaller one so that its active parameter
# count (concept head included) matches. "tiny" is for CPU tests and the quickstart.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, ntp_embd=128, cocomix_embd=128, insert_layer=2, context_length=256),
    "69m": dict(n_layer=8, n_head=8, ntp_embd=624, cocomix_embd=512, insert_layer=3),
    "386m": dict(n_layer=24, n_head=16, ntp_embd=1072, cocomix_embd=1024, insert_layer=5),
    "1.38b": dict(n_layer=24, n_head=16, ntp_embd=2096, cocomix_embd=2048, insert_layer=5),
}


def preset(name: str, variant: str, **overrides) -> ModelConfig:
    """The config of a named size for one variant, e.g. `preset("69m", "cocomix")`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    ntp_embd, cocomix_embd = spec.pop("ntp_embd"), spec.pop("cocomix_embd")
    width = cocomix_embd if variant == "cocomix" else ntp_embd
    return replace(ModelConfig(variant=variant, n_embd=width, **spec), **overrides)


@dataclass(frozen=True)
class ConceptIntervention:
    """Edit concept logits before the top-k: multiply (`scale`) or pin (`value`) the given concepts."""

    concept_ids: tuple[int, ...]
    scale: float | None = None
    value: float | None = None

    def __post_init__(self) -> None:
        if (self.scale is None) == (self.value is None):
            raise ValueError("a concept intervention takes exactly one of `scale` and `value`")

    def apply(self, concept_logits: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(self.concept_ids, device=concept_logits.device, dtype=torch.long)
        edited = concept_logits.clone()
        if self.value is not None:
            edited[..., ids] = self.value
        else:
            edited[..., ids] = edited[..., ids] * self.scale
        return edited


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, vocab): logits for the token after each position."""
    concept_logits: torch.Tensor | None = None
    """(B, T, C) for CoCoMix, before any intervention; None otherwise."""
    hidden: torch.Tensor | None = None
    """(B, T, D) the last block's state of each token, before the final LayerNorm: what an objective's
    training-only head reads (`pipelines.training.objectives`)."""


class LayerCache:
    """Keys and values one attention layer has seen, grown by `update`."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """A cache per block. `GPT.forward` reads any object with such `layers` (each with `length` and
    `update`), so transformers' own cache serves too, through a view (`modeling_cocomix.py`)."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]


# Head dims are padded with zeros to a multiple of this, per device type, before attention: on CUDA the
# memory-efficient and cuDNN kernels of `scaled_dot_product_attention` refuse a head dim that is not a
# multiple of 8 (the 69M preset's is 624 / 8 = 78) and flash pads it itself, one tensor at a time. Zero
# columns add exact zeros to every q . k and give zero output columns, which are sliced off: the same math.
HEAD_DIM_MULTIPLE = {"cuda": 8}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, S, D = x.shape
        head_dim = D // self.n_head
        # Without a cache only: a cache (and transformers' cache, through its view) holds real head dims.
        pad = 0 if cache is not None else -head_dim % HEAD_DIM_MULTIPLE.get(x.device.type, 1)
        qkv = self.c_attn(x).view(B, S, 3, self.n_head, head_dim)
        if pad:
            qkv = F.pad(qkv, (0, pad))  # one copy of the packed q, k, v
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, head_dim + pad) each
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(k, v)
        dropout = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(head_dim)  # SDPA's default, of the unpadded head dim
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
        else:
            # New slots see every cached slot and the new slots up to themselves (bottom-right causal).
            mask = torch.ones(S, past + S, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        if pad:
            y = y[..., :head_dim]
        return self.c_proj(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


def normalize_features(h: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h - mean) / (std + eps) over features with the unbiased std and no affine, as the official code."""
    mean = h.mean(dim=-1, keepdim=True)
    centered = h - mean
    std = centered.std(dim=-1, keepdim=True)
    return centered / (std + eps), mean, std


class ConceptBranch(nn.Module):
    """Predict concept logits from a hidden state and compress the top-k of them into one vector."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.k = config.concept_k
        self.eps = config.concept_norm_eps
        self.pre_bias = nn.Parameter(torch.zeros(config.n_embd))
        self.concept_head = nn.Linear(config.n_embd, config.n_concepts)
        # Row c is concept c's direction: the compression is an embedding-bag over the k kept rows.
        self.compress_weight = nn.Parameter(torch.empty(config.n_concepts, config.n_embd))
        self.compress_bias = nn.Parameter(torch.zeros(config.n_embd))

    def forward(
        self, h: torch.Tensor, intervention: ConceptIntervention | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (continuous concepts (B, T, D), concept logits (B, T, C) before the intervention)."""
        x, mean, std = normalize_features(h, self.eps)
        concept_logits = self.concept_head(x - self.pre_bias)
        steered = intervention.apply(concept_logits) if intervention is not None else concept_logits
        kept_values, kept_ids = steered.topk(self.k, dim=-1)  # (B, T, k) each
        compressed = self.compress_sparse(kept_values, kept_ids)
        continuous = compressed + self.pre_bias
        return continuous * std + mean, concept_logits

    def compress_sparse(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_j values_j * W[ids_j] + b: reads k rows of W per token, never the dense (C x D) product."""
        B, T, k = ids.shape
        # Under autocast the logits are bf16 while the table stays fp32; embedding_bag needs one dtype.
        weights = values.reshape(B * T, k).to(self.compress_weight.dtype)
        bag = F.embedding_bag(
            ids.reshape(B * T, k), self.compress_weight, per_sample_weights=weights, mode="sum"
        )
        return bag.view(B, T, -1) + self.compress_bias


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.concepts = ConceptBranch(config) if config.variant == "cocomix" else None
        self.pause = nn.Parameter(torch.zeros(config.n_embd)) if config.variant == "pause" else None
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.concepts is not None:
            nn.init.normal_(self.concepts.compress_weight, mean=0.0, std=0.02)
        if self.pause is not None:
            nn.init.normal_(self.pause, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        intervention: ConceptIntervention | None = None,
    ) -> ModelOutput:
        """Logits for `idx` (B, T); with a cache, `idx` holds only the tokens after those it has seen."""
        x, concept_logits = self.trunk(idx, kv_cache, intervention)
        return ModelOutput(logits=self.head(x), concept_logits=concept_logits, hidden=x)

    def trunk(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        intervention: ConceptIntervention | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last block's state of each token (B, T, D) (its mixed-in slot where slots are interleaved)
        and the concept logits: everything but the head. Training calls it and `head` apart, so that the
        head can be compiled with the loss when the blocks are sharded (`pipelines.training.parallel`)."""
        B, T = idx.shape
        start = self.tokens_in(kv_cache)
        if start + T > self.config.context_length:
            raise ValueError(f"{start + T} tokens exceed the context length {self.config.context_length}")
        x = self.embed(idx, start)  # (B, T, D)
        concept_logits = None
        for i, block in enumerate(self.h):
            if i == self.config.insert_layer and self.config.variant != "ntp":
                x, concept_logits = self.mix(x, intervention)  # (B, S, D)
            x = block(x, kv_cache.layers[i] if kv_cache is not None else None)
        if self.config.doubles_length:
            x = x[:, 1::2]  # the mixed-in slot of each token predicts the next token
        return x, concept_logits

    def embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """Token plus position embeddings of `idx` (B, T), whose first token is at position `start`."""
        positions = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(positions))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of the trunk's states: the final LayerNorm and the tied embeddings."""
        return F.linear(self.ln_f(x), self.wte.weight)

    def mix(self, h: torch.Tensor, intervention: ConceptIntervention | None):
        if self.concepts is None:
            mixed_in, concept_logits = self.pause.expand_as(h), None
        else:
            mixed_in, concept_logits = self.concepts(h, intervention)
        if self.config.mixing == "add":
            return h + mixed_in, concept_logits
        if self.config.mixing == "none":  # the concept loss still trains the head and the blocks below it
            return h, concept_logits
        B, T, D = h.shape
        return torch.stack([h, mixed_in], dim=2).view(B, 2 * T, D), concept_logits

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def tokens_in(self, kv_cache) -> int:
        """Tokens (positions) a cache has seen, from its first block: one slot per token there, two when
        concepts or pauses are interleaved from block 0 on."""
        if kv_cache is None:
            return 0
        slots_per_token = 2 if self.config.doubles_length and self.config.insert_layer == 0 else 1
        return kv_cache.layers[0].length // slots_per_token

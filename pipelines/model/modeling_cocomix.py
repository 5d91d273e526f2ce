"""A cocomix student (NTP, CoCoMix or pause) as a transformers causal LM: `CocomixForCausalLM`.

The module wraps `gpt.GPT` (the model cocomix trains) and adds only what transformers asks of a causal
LM: a config class, `generate()` through `GenerationMixin` with transformers' own cache, the loss on
`labels`, and the concept logits in the output. `cocomix export` copies this file, `gpt.py` and
`configuration_cocomix.py` as they are into the exported folder, with `auto_map` in its config.json, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` runs this same code without cocomix
installed; importing `pipelines.model` registers the classes, so cocomix itself needs no remote code.

Transformers' cache holds, per block, one slot per token below the insert layer and two above it, as
ours does; positions count tokens, read off the first block's cache (`GPT.tokens_in`), so the position
ids that `generate` computes are not needed. Padding is not: every position must be a real token
(lm-eval's `hf` model pads on the right for log-likelihoods, which a causal model ignores).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_cocomix import CocomixConfig
from .gpt import GPT, ConceptIntervention

# transformers 5 names the cache `cache` in forward and outputs; 4.x named it `past_key_values`.
_CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else ("past_key_values")
)


@dataclasses.dataclass
class CocomixCausalLMOutput(CausalLMOutputWithPast):
    concept_logits: torch.FloatTensor | None = None
    """(batch, tokens, concepts): the CoCoMix head's concept logits, before any intervention; None for
    NTP and pause students."""


class _CacheLayer:
    """One block's view of a transformers cache, in the interface `gpt.LayerCache` has."""

    def __init__(self, cache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.layer_idx)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, self.layer_idx)


class _CacheView:
    def __init__(self, cache, n_layer: int) -> None:
        self.layers = [_CacheLayer(cache, i) for i in range(n_layer)]


class CocomixPreTrainedModel(PreTrainedModel):
    config_class = CocomixConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_cache_class = True

    def _init_weights(self, module) -> None:
        # Weights come from the checkpoint; a fresh model is initialised by `GPT` itself.
        pass


class CocomixForCausalLM(CocomixPreTrainedModel, GenerationMixin):
    def __init__(self, config: CocomixConfig):
        super().__init__(config)
        self.transformer = GPT(config.model_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value) -> None:
        self.transformer.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        past_key_values=None,
        concept_intervention: ConceptIntervention | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CocomixCausalLMOutput:
        """`labels` (batch, tokens) give the mean next-token loss, shifted as in transformers (-100
        ignored). `concept_intervention` edits the concept logits before the top-k (steering)."""
        if input_ids is None:
            raise ValueError("CocomixForCausalLM reads `input_ids` (token embeddings are not accepted)")
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError(
                "CocomixForCausalLM does not take padded positions (an attention_mask with zeros): "
                "positions count tokens from the start, so generate one prompt at a time or pad on the right."
            )
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        view = _CacheView(cache, self.config.n_layer) if use_cache else None
        out = self.transformer(input_ids, kv_cache=view, intervention=concept_intervention)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        result = CocomixCausalLMOutput(loss=loss, logits=out.logits, concept_logits=out.concept_logits)
        if use_cache:
            result[_CACHE_FIELD] = cache
        return result

"""The transformers config of a cocomix student (`model_type = "cocomix"`): `ModelConfig`'s fields as such.

Copied as it is into every exported folder, beside `gpt.py` and `modeling_cocomix.py`; it imports only
transformers and `gpt.py`, so that transformers' `trust_remote_code` can load it without cocomix installed.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .gpt import ModelConfig

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class CocomixConfig(PretrainedConfig):
    model_type = "cocomix"
    # The names generic transformers code (caches, lm-eval's `hf` model, pipelines) asks a config for.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "context_length",
    }

    def __init__(self, **kwargs):
        defaults = ModelConfig()
        for name in MODEL_FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        # The LM head is the token embedding (`GPT.forward` reads `wte.weight`): there is nothing to tie.
        kwargs.setdefault("tie_word_embeddings", False)
        self.use_cache = kwargs.pop("use_cache", True)  # transformers 5 no longer keeps it on every config
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The student's own config (validated: a bad variant or size fails here)."""
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})

"""The ReLU sparse autoencoder (SAELens' `standard` architecture): every latent with a positive
pre-activation is active, so how many are active varies from token to token.

`acts = ReLU(W_enc^T (norm(x) - b_dec) + b_enc)`, with `- b_dec` only when `apply_b_dec_to_input` (SAELens'
flag; Gemma Scope's SAEs do not subtract it). Parameters and the rest as in `pipelines.sae.base`.
`JumpReLUSAE` (`pipelines.sae.jumprelu_sae`) is this module with a per-latent threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines.sae.base import SparseAutoencoder


class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    saelens_architecture = "standard"

    def activate(self, pre: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return pre.relu()

    def saelens_config(self) -> dict[str, Any]:
        return {
            "architecture": self.saelens_architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "normalize_activations": self.normalize,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
        }

    @classmethod
    def from_saelens_config(cls, config: dict[str, Any], where: Path) -> ReLUSAE:
        normalize = config.get("normalize_activations") or "none"
        apply_b_dec = config.get("apply_b_dec_to_input", True)
        return cls(int(config["d_in"]), int(config["d_sae"]), normalize, apply_b_dec)

"""The JumpReLU sparse autoencoder (Rajamanoharan et al., 2024; Gemma Scope, SAELens' `jumprelu`): a latent
is active where its pre-activation exceeds its own learned threshold.

`acts = ReLU(pre) * (pre > threshold)`, `pre` as in `ReLUSAE`; `threshold (d_sae)` is stored as such by
SAELens and Gemma Scope (SAELens' training-time `log_threshold` is converted when a file holds it).
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.sae.relu_sae import ReLUSAE


class JumpReLUSAE(ReLUSAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", apply_b_dec_to_input: bool = True):
        super().__init__(d_in, d_sae, normalize, apply_b_dec_to_input)
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    def activate(self, pre: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        threshold = self.threshold if ids is None else self.threshold[ids]
        return pre.relu() * (pre > threshold)

"""The ReLU sparse autoencoder (SAELens' `standard` architecture): every latent with a positive
pre-activation is active, so how many are active varies from token to token.

`acts = ReLU(W_enc^T (norm(x) - b_dec) + b_enc)`, with `- b_dec` only when `apply_b_dec_to_input` (SAELens'
flag; Gemma Scope's SAEs do not subtract it). Parameter names and shapes as in `pipelines.sae.topk_sae`.
`JumpReLUSAE` (`pipelines.sae.jumprelu_sae`) is this module with a per-latent threshold.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.sae.normalization import check_normalization, normalize_input


class ReLUSAE(nn.Module):
    architecture = "relu"

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", apply_b_dec_to_input: bool = True):
        super().__init__()
        check_normalization(normalize)
        self.d_in, self.d_sae, self.normalize = d_in, d_sae, normalize
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def prepare_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.normalize == "layer_norm":
            return normalize_input(x)
        return x, None, None

    def _centred(self, x_prepared: torch.Tensor) -> torch.Tensor:
        return x_prepared - self.b_dec if self.apply_b_dec_to_input else x_prepared

    def pre_activation(self, x_prepared: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) dense pre-activations."""
        return self._centred(x_prepared) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Activations from pre-activations of all latents, or of the latents `ids` alone."""
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) dense activations; zero means inactive."""
        return self.activate(self.pre_activation(self.prepare_input(x)[0]))

    def latent_activations(self, x_prepared: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(..., n) activations of the latents `ids` alone (what steering scales)."""
        return self.activate(self._centred(x_prepared) @ self.W_enc[:, ids] + self.b_enc[ids], ids)

    def decode(self, acts: torch.Tensor, mean=None, std=None) -> torch.Tensor:
        recon = acts @ self.W_dec + self.b_dec
        return recon * std + mean if mean is not None else recon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of `x` in its own (un-normalised) space."""
        x_prepared, mean, std = self.prepare_input(x)
        return self.decode(self.activate(self.pre_activation(x_prepared)), mean, std)

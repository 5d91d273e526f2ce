"""The TopK sparse autoencoder (Gao et al., 2024): the k largest pre-activations of each token, after ReLU.

SAELens names: `W_enc (d_in, d_sae)`, `b_enc (d_sae)`, `W_dec (d_sae, d_in)`, `b_dec (d_in)`. Encoding
is `TopK(ReLU)` of `W_enc^T (norm(x) - b_dec) + b_enc`; with `normalize = "layer_norm"` the input is first
centred and divided by (unbiased std + eps), and decoding undoes it, as in OpenAI's v5 SAEs. EleutherAI's
sparsify SAEs are this module with `normalize = "none"` (it takes ReLU before TopK, which selects the same
non-zero latents). Their file formats are read and written in `pipelines.sae.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipelines.errors import InputError
from pipelines.sae.normalization import check_normalization, normalize_input


@dataclass(frozen=True)
class TopKEncoding:
    values: torch.Tensor
    """(..., k) activations of the k largest latents after ReLU (some may be 0)."""
    ids: torch.Tensor
    """(..., k) latent ids."""


class TopKSAE(nn.Module):
    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, normalize: str = "layer_norm"):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise InputError(f"SAE k ({k}) must be between 1 and its width ({d_sae}).")
        check_normalization(normalize)
        self.d_in, self.d_sae, self.k, self.normalize = d_in, d_sae, k, normalize
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def prepare_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.normalize == "layer_norm":
            return normalize_input(x)
        return x, None, None

    def pre_activation(self, x_prepared: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) dense pre-activations; only the `paper` attribution needs all of them."""
        return (x_prepared - self.b_dec) @ self.W_enc + self.b_enc

    def latent_activations(self, x_prepared: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(..., n) ReLU pre-activations of the latents `ids` alone, whether or not they are in the top k
        (what steering scales)."""
        return ((x_prepared - self.b_dec) @ self.W_enc[:, ids] + self.b_enc[ids]).relu()

    def encode_topk(self, x: torch.Tensor) -> TopKEncoding:
        pre = self.pre_activation(self.prepare_input(x)[0])
        values, ids = pre.topk(self.k, dim=-1)
        return TopKEncoding(values=values.relu(), ids=ids)

    def decode_topk(self, encoding: TopKEncoding, mean=None, std=None) -> torch.Tensor:
        recon = torch.einsum("...k,...kd->...d", encoding.values, self.W_dec[encoding.ids]) + self.b_dec
        return recon * std + mean if mean is not None else recon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of `x` in its own (un-normalised) space."""
        x_prepared, mean, std = self.prepare_input(x)
        pre = self.pre_activation(x_prepared)
        values, ids = pre.topk(self.k, dim=-1)
        return self.decode_topk(TopKEncoding(values.relu(), ids), mean, std)

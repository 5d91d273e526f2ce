"""The TopK sparse autoencoder (Gao et al., 2024): the k largest pre-activations of each token, after ReLU.

Encoding is `TopK(ReLU)` of `W_enc^T (norm(x) - b_dec) + b_enc` (`pipelines.sae.base`); with `normalize =
"layer_norm"` the input is first centred and divided by (unbiased std + eps), and decoding undoes it, as in
OpenAI's v5 SAEs. EleutherAI's sparsify SAEs are this module with `normalize = "none"` (it takes ReLU before
TopK, which selects the same non-zero latents). Their file formats are read and written in
`pipelines.sae.formats`; `train-sae` trains it with `sae.architecture = "topk"` (the default, the paper's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.errors import InputError
from pipelines.sae.base import ActiveLatents, SparseAutoencoder, TrainingCode

TopKEncoding = ActiveLatents


class TopKSAE(SparseAutoencoder):
    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, normalize: str = "layer_norm"):
        if not 1 <= k <= d_sae:
            raise InputError(f"SAE k ({k}) must be between 1 and its width ({d_sae}).")
        super().__init__(d_in, d_sae, normalize)
        self.k = self.k_per_token = k

    def activate(self, pre: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:  # the latents' own ReLU, whether or not they are among the k largest
            return pre.relu()
        values, top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top, values.relu())

    def encode_topk(self, x: torch.Tensor) -> ActiveLatents:
        pre = self.pre_activation(self.prepare_input(x)[0])
        values, ids = pre.topk(self.k, dim=-1)
        return ActiveLatents(values=values.relu(), ids=ids)

    encode_active = encode_topk

    def decode_topk(self, encoding: ActiveLatents, mean=None, std=None) -> torch.Tensor:
        recon = torch.einsum("...k,...kd->...d", encoding.values, self.W_dec[encoding.ids]) + self.b_dec
        return recon * std + mean if mean is not None else recon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of `x` in its own (un-normalised) space, from the k decoder rows alone."""
        x_prepared, mean, std = self.prepare_input(x)
        pre = self.pre_activation(x_prepared)
        values, ids = pre.topk(self.k, dim=-1)
        return self.decode_topk(ActiveLatents(values.relu(), ids), mean, std)

    # -- the SAELens layout --

    def saelens_config(self) -> dict[str, Any]:
        return {
            "architecture": "topk",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "activation_fn_kwargs": {"k": self.k},
            "normalize_activations": self.normalize,
            "apply_b_dec_to_input": True,
        }

    @classmethod
    def from_saelens_config(cls, config: dict[str, Any], where: Path) -> TopKSAE:
        if not config.get("apply_b_dec_to_input", True):
            raise InputError(f"{where}: `apply_b_dec_to_input = false` is not supported.")
        normalize = config.get("normalize_activations") or "none"
        return cls(int(config["d_in"]), int(config["d_sae"]), int(config["k"]), normalize=normalize)

    # -- training --

    @classmethod
    def for_training(cls, d_in: int, d_sae: int, k: int) -> TopKSAE:
        return cls(d_in, d_sae, k, normalize="layer_norm")

    def train_encode(self, x: torch.Tensor, dense_pre_grad: bool = False) -> TrainingCode:
        """`ids` and `values` (N, k): each token's top k.

        The top k are chosen without a graph and their values recomputed from the k encoder columns chosen:
        the same values, whose backward reads k columns per token where the dense pre-activations' would be
        two more (N x C) products. `pre` keeps a graph only where the AuxK loss reads it (`dense_pre_grad`).
        """
        centred = x - self.b_dec
        with torch.set_grad_enabled(dense_pre_grad and torch.is_grad_enabled()):
            pre = centred @ self.W_enc + self.b_enc
        ids = pre.detach().topk(self.k, dim=-1).indices  # (N, k)
        # Rows of a contiguous copy of W_enc^T: a column of W_enc itself is strided by C.
        columns = F.embedding(ids, self.W_enc.t().contiguous())  # (N, k, d_in)
        values = (torch.einsum("nkd,nd->nk", columns, centred) + self.b_enc[ids]).relu()
        recon = F.embedding_bag(ids, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        return TrainingCode(pre, ids, values, recon)

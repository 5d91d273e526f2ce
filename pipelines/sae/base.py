"""The base class of every SAE family: the parameters, input normalisation and decoding they share, and the
few methods through which loading, saving, attribution, steering and `train-sae` use an SAE without knowing
its family.

SAELens names and shapes: `W_enc (d_in, d_sae)`, `b_enc (d_sae)`, `W_dec (d_sae, d_in)`, `b_dec (d_in)`.
`pre = W_enc^T (norm(x) - b_dec) + b_enc` (without `- b_dec` where `apply_b_dec_to_input` is false, as in
Gemma Scope); a family says how pre-activations become activations (`activate`), zero meaning inactive.
`k_per_token` is the size of the active set where it is the same for every token (TopK), else None: the
families with a fixed k give attribution their k active latents directly (`encode_active`), the others are
read densely. A family that `train-sae` trains also gives `for_training` and `train_encode`.
Families are declared by name in `pipelines.sae.families`; adding one is a module and one registration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipelines.sae.normalization import check_normalization, normalize_input


@dataclass(frozen=True)
class ActiveLatents:
    values: torch.Tensor
    """(..., k) activations of each token's k active latents (some may be 0)."""
    ids: torch.Tensor
    """(..., k) their latent ids."""


@dataclass(frozen=True)
class TrainingCode:
    """One training batch through the SAE: what the trainer's loss, dead-latent count and AuxK read."""

    pre: torch.Tensor
    """(N, d_sae) pre-activations; with a graph only where the AuxK loss needs one."""
    ids: torch.Tensor
    """latent ids of the kept activations, any shape (`values` has the same)."""
    values: torch.Tensor
    """the kept activations (>= 0; a zero one did not fire)."""
    recon: torch.Tensor
    """(N, d_in) reconstruction in the normalised space."""


class SparseAutoencoder(nn.Module):
    architecture: ClassVar[str]
    """The family's name in `pipelines.sae.families` (and `sae.architecture`)."""
    k_per_token: int | None = None

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", apply_b_dec_to_input: bool = True):
        super().__init__()
        check_normalization(normalize)
        self.d_in, self.d_sae, self.normalize = d_in, d_sae, normalize
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # -- encoding --

    def prepare_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(normalised x, mean, std); mean and std are None without normalisation."""
        if self.normalize == "layer_norm":
            return normalize_input(x)
        return x, None, None

    def _centred(self, x_prepared: torch.Tensor) -> torch.Tensor:
        return x_prepared - self.b_dec if self.apply_b_dec_to_input else x_prepared

    def pre_activation(self, x_prepared: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) dense pre-activations."""
        return self._centred(x_prepared) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Activations from the pre-activations of all latents, or of the latents `ids` alone (each then
        judged by its own gate, whatever the others do)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) dense activations of raw inputs; zero means inactive."""
        return self.activate(self.pre_activation(self.prepare_input(x)[0]))

    def encode_active(self, x: torch.Tensor) -> ActiveLatents:
        """Each token's `k_per_token` active latents; only families with a fixed k have it."""
        raise NotImplementedError(f"a {self.architecture} SAE has no fixed number of active latents")

    def latent_activations(self, x_prepared: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(..., n) activations of the latents `ids` alone (what steering scales)."""
        return self.activate(self._centred(x_prepared) @ self.W_enc[:, ids] + self.b_enc[ids], ids)

    # -- decoding --

    def decode(self, acts: torch.Tensor, mean=None, std=None) -> torch.Tensor:
        recon = acts @ self.W_dec + self.b_dec
        return recon * std + mean if mean is not None else recon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of `x` in its own (un-normalised) space."""
        x_prepared, mean, std = self.prepare_input(x)
        return self.decode(self.activate(self.pre_activation(x_prepared)), mean, std)

    # -- the SAELens layout (`pipelines.sae.formats`) --

    def saelens_config(self) -> dict[str, Any]:
        """The family's part of the `cfg.json` SAELens reads this SAE from."""
        raise NotImplementedError

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of `sae_weights.safetensors`."""
        return {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}

    @classmethod
    def from_saelens_config(cls, config: dict[str, Any], where: Path) -> SparseAutoencoder:
        """An empty SAE of the shape a SAELens `cfg.json` (`where`) describes; `k` already resolved."""
        raise NotImplementedError

    # -- training (families `train-sae` trains) --

    @classmethod
    def for_training(cls, d_in: int, d_sae: int, k: int) -> SparseAutoencoder:
        """An SAE of `train-sae`'s recipe (layer-norm input), `k` active latents per token on average."""
        raise NotImplementedError(f"`train-sae` does not train {cls.architecture} SAEs")

    def train_encode(self, x: torch.Tensor, dense_pre_grad: bool = False) -> TrainingCode:
        """Normalised inputs `x` (N, d_in) through the SAE as training sees them."""
        raise NotImplementedError

    def observe_training_batch(self, code: TrainingCode) -> None:
        """Called after each optimizer step with its batch's code (state a family keeps, e.g. a threshold)."""

    def end_training(self, batches: Iterable[torch.Tensor]) -> None:
        """Called once after the last step, before the last evaluation, with the normalised batches of the
        last buffer (what a family estimates from the final weights)."""

"""The BatchTopK sparse autoencoder (Bussmann et al., 2024; SAELens' `batchtopk`): trained with the
`batch_size x k` largest activations kept across the whole batch rather than k per token, so a token may use
more latents or fewer than k while the batch averages k; used with one threshold for every latent.

Training: `acts = ReLU(pre)`, the `N k` largest of the (N, d_sae) batch kept. The threshold t for inference,
`acts = ReLU(pre) * (pre > t)` (and the evaluations during training): during training SAELens' rule, after
each step t moves from 0 towards the batch's smallest kept activation, `t <- (1 - 0.01) t + 0.01 min`, in
double precision. That average lags the weights by about a hundred steps, which over a short run (the study's
55) leaves t far from the batches' cutoff (on the tiny test teacher, 80 steps of k = 4 with the average
started at the first batch's minimum ended at L0 0.7). So after the last step t is set as Bussmann et al.
(2024) estimate it, the mean over batches of the smallest kept activation, here the last buffer's batches
with the final weights (L0 4.0 there).

Saved as SAELens saves a BatchTopK SAE for inference (`sae_lens/saes/batchtopk_sae.py`,
`process_state_dict_for_saving_inference`, and `save_inference_model`): a `jumprelu` folder, `cfg.json` with
the fields of SAELens' `JumpReLUSAEConfig` and `sae_weights.safetensors` whose `threshold (d_sae)` repeats t.
It loads back as `pipelines.sae.jumprelu_sae.JumpReLUSAE`, in cocomix and in SAELens (which, finding no
`sae_lens_version`, reads cocomix's top-level `model_name`/`hook_name` keys as its metadata). Train it with
`sae.architecture = "batchtopk"`; `sae.k` is then the mean L0 of a training batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from pipelines.errors import InputError
from pipelines.sae.base import SparseAutoencoder, TrainingCode

THRESHOLD_LR = 0.01  # SAELens' `topk_threshold_lr` default


class BatchTopKSAE(SparseAutoencoder):
    architecture = "batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int, normalize: str = "layer_norm"):
        if not 1 <= k <= d_sae:
            raise InputError(f"SAE k ({k}) must be between 1 and its width ({d_sae}).")
        super().__init__(d_in, d_sae, normalize)
        self.k = k  # on average over a batch: a token's own count varies (`k_per_token` stays None)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def activate(self, pre: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return pre.relu() * (pre > self.threshold)

    # -- the SAELens layout: saved for inference as SAELens saves it, a `jumprelu` SAE --

    def saelens_config(self) -> dict[str, Any]:
        return {
            "architecture": "jumprelu",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": self.normalize,
            "reshape_activations": "none",
            "metadata": {},
        }

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        tensors["threshold"] = torch.ones(self.d_sae) * self.threshold.item()
        return tensors

    # -- training --

    @classmethod
    def for_training(cls, d_in: int, d_sae: int, k: int) -> BatchTopKSAE:
        return cls(d_in, d_sae, k, normalize="layer_norm")

    def train_encode(self, x: torch.Tensor, dense_pre_grad: bool = False) -> TrainingCode:
        """`ids` and `values` (N k,): the batch's kept activations, each with its latent id."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc  # (N, C); its graph carries the kept values
        flat = pre.relu().flatten()
        kept = flat.topk(x.shape[0] * self.k)
        acts = torch.zeros_like(flat).scatter(0, kept.indices, kept.values).view_as(pre)
        return TrainingCode(pre, kept.indices % self.d_sae, kept.values, acts @ self.W_dec + self.b_dec)

    @torch.no_grad()
    def end_training(self, batches: Iterable[torch.Tensor]) -> None:
        smallest = torch.stack([_smallest_positive(self.train_encode(x).values) for x in batches])
        smallest = smallest[smallest.isfinite()]
        if smallest.numel():
            self.threshold.copy_(smallest.mean())

    @torch.no_grad()
    def observe_training_batch(self, code: TrainingCode) -> None:
        """SAELens' update towards the smallest positive kept activation, without a read-back."""
        smallest = _smallest_positive(code.values.detach())
        moved = (1 - THRESHOLD_LR) * self.threshold + THRESHOLD_LR * smallest
        self.threshold.copy_(torch.where(smallest.isfinite(), moved, self.threshold))


def _smallest_positive(values: torch.Tensor) -> torch.Tensor:
    """The smallest positive value, in double precision; inf where none is."""
    return values.masked_fill(values <= 0, float("inf")).min().double()

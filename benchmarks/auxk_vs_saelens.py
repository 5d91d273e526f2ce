"""Our AuxK term (`pipelines.sae.trainer.auxk_loss`) against SAELens's TopK AuxK on the same tensors.

    /work/venv-saelens/bin/python benchmarks/auxk_vs_saelens.py

(the venv of `benchmarks/sae_vs_saelens.py`). Both terms get the same pre-activations, residual, decoder and
dead mask (float64), in two cases: every selected dead pre-activation positive, and raw (some negative), and
the script prints the loss and the gradients with respect to the pre-activations and the decoder of each,
after undoing the differences named below, with the largest relative difference. What differs, by design:

1. Normalisation. Ours is OpenAI's `normalized_mse`: the squared error divided by the residual's variance
   over the batch, times `sae.aux_coef` = 1/32. SAELens's is the unnormalised squared error (summed over
   dimensions, mean over tokens), times its `aux_loss_coefficient` = 1 and `min(n_dead / k_aux, 1)`.
2. ReLU. Ours takes the ReLU of the selected dead pre-activations (OpenAI: the aux latents fire as latents
   do); SAELens decodes them as they are, negative values included, so a dead latent whose pre-activations
   are all negative still gets a gradient.
3. Decoder norm. SAELens multiplies pre-activations by the decoder row norms and divides again when it
   decodes (`rescale_acts_by_decoder_norm`): the same function, whose decoder gradient has a radial part;
   ours keeps rows at unit norm and removes that part before each step, so the decoder gradients are
   compared after removing it from both.
4. Dead counting (in the trainers, not the term): SAELens counts a latent dead after more than
   `dead_feature_window` steps without firing; ours after `dead_after_tokens` tokens, at least that many.

With (1) undone (ours x residual variance / coefficient, SAELens / (coefficient x scale)) and (3) as said, the
terms must agree to float64 rounding in the positive case; in the raw case they must differ, and our formula
without the ReLU must agree with SAELens's.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.sae.trainer import auxk_loss  # noqa: E402

D_IN, D_SAE, K, TOKENS, OURS_COEF = 64, 512, 8, 256, 1 / 32


def main() -> None:
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        sys.exit("sae_lens is not importable; see benchmarks/sae_vs_saelens.py for its venv")

    torch.manual_seed(0)
    lens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float64", device="cpu"))
    with torch.no_grad():
        lens.W_dec.copy_(torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, dtype=torch.float64), dim=-1))
    many = torch.rand(D_SAE) < 0.3
    few = torch.zeros(D_SAE, dtype=torch.bool)
    few[torch.randperm(D_SAE)[:10]] = True  # fewer than k_aux: SAELens scales its term by n_dead / k_aux
    residual = torch.randn(TOKENS, D_IN, dtype=torch.float64)
    sae_out = torch.randn(TOKENS, D_IN, dtype=torch.float64)
    k_aux = D_IN // 2
    raw = torch.randn(TOKENS, D_SAE, dtype=torch.float64)
    cases = {  # name: (pre-activations, dead mask)
        "positive": (raw.abs() + 0.1, many),  # every selected dead pre-activation > 0: the ReLU is a no-op
        "few dead": (raw.abs() + 0.1, few),
        "raw": (raw - 1.0, many),  # most are negative
    }
    print(
        f"d_in {D_IN}, {D_SAE} latents, {TOKENS} tokens, k_aux {k_aux}; dead: {int(many.sum())} "
        f"({int(few.sum())} in `few dead`); coefficients: SAELens {lens.cfg.aux_loss_coefficient}, "
        f"ours {OURS_COEF:.5f} (applied by the trainer; undone below with the normalisations)"
    )
    print(f"{'case':<9} {'term: quantity':<44} {'ours':>16} {'SAELens':>16} {'max rel diff':>13}")
    for case, (values, dead) in cases.items():
        n_dead = int(dead.sum())
        scale = min(n_dead / k_aux, 1.0)
        # auxk_loss is the normalised error; the trainer multiplies it by sae.aux_coef (OURS_COEF)
        ours_term = partial(ours_auxk, residual=residual, dead=dead, aux_k=min(k_aux, n_dead))
        ours = rescaled(terms(ours_term, values, lens.W_dec), variance(residual))
        lens_term = partial(saelens_term, lens, residual=residual, sae_out=sae_out, dead=dead)
        theirs = terms(lens_term, values, lens.W_dec)
        theirs = rescaled(theirs, 1 / (lens.cfg.aux_loss_coefficient * scale))
        report(case, "ours", ours, theirs)
        if case == "raw":
            no_relu = partial(auxk_without_relu, residual=residual, dead=dead, aux_k=k_aux)
            report(case, "ours without ReLU", terms(no_relu, values, lens.W_dec), theirs)


def ours_auxk(pre, W_dec, residual, dead, aux_k):
    return auxk_loss(pre, residual, dead, aux_k, W_dec)


def saelens_term(lens, pre, W_dec, *, residual, sae_out, dead):
    """SAELens's `calculate_topk_aux_loss` with `pre` and `W_dec` as the graph's leaves."""
    original = lens._parameters["W_dec"]
    lens._parameters["W_dec"] = W_dec  # our leaf in its place, so that the gradient reaches it
    try:
        # SAELens passes hidden_pre already multiplied by the decoder norms (rescale_acts_by_decoder_norm)
        hidden_pre = pre * W_dec.norm(dim=-1)
        return lens.calculate_topk_aux_loss(
            sae_in=sae_out + residual, sae_out=sae_out, hidden_pre=hidden_pre, dead_neuron_mask=dead
        )
    finally:
        lens._parameters["W_dec"] = original


def auxk_without_relu(pre, W_dec, *, residual, dead, aux_k):
    """Our formula with the ReLU left out and unnormalised: SAELens's term over its coefficient and scale."""
    values, ids = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
    recon = torch.einsum("nk,nkd->nd", values, W_dec[ids])
    return (residual - recon).pow(2).sum(-1).mean()


def terms(term, pre_values, W_dec) -> dict[str, torch.Tensor]:
    """The term's value and its gradients (decoder: radial part removed) at fresh leaves."""
    pre = pre_values.clone().requires_grad_(True)
    w = W_dec.detach().clone().requires_grad_(True)
    loss = term(pre, w)
    grad_pre, grad_dec = torch.autograd.grad(loss, (pre, w))
    unit = w.detach() / w.detach().norm(dim=-1, keepdim=True)
    grad_dec = grad_dec - (grad_dec * unit).sum(-1, keepdim=True) * unit
    return {"loss": loss.detach(), "d loss / d pre": grad_pre, "d loss / d W_dec (tangent)": grad_dec}


def rescaled(values: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {name: value * factor for name, value in values.items()}


def variance(residual: torch.Tensor) -> float:
    return (residual - residual.mean(0)).pow(2).sum(-1).mean().item()


def report(case: str, label: str, ours: dict, theirs: dict) -> None:
    for name in ours:
        a, b = ours[name], theirs[name]
        diff = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
        shown_a = f"{a.item():.6g}" if a.dim() == 0 else f"|.|max {a.abs().max().item():.4g}"
        shown_b = f"{b.item():.6g}" if b.dim() == 0 else f"|.|max {b.abs().max().item():.4g}"
        print(f"{case:<9} {label + ': ' + name:<44} {shown_a:>16} {shown_b:>16} {diff:>13.2e}")


if __name__ == "__main__":
    main()

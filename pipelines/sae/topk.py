"""TopK sparse autoencoders: one module, two on-disk formats, and the loader that tells them apart.

The module uses SAELens names: `W_enc (d_in, d_sae)`, `b_enc (d_sae)`, `W_dec (d_sae, d_in)`, `b_dec (d_in)`.
Encoding is `TopK(ReLU)` of `W_enc^T (norm(x) - b_dec) + b_enc`; with `normalize = "layer_norm"` the input is
first centred and divided by (unbiased std + eps), and decoding undoes it, as in OpenAI's v5 SAEs.

Formats:
- OpenAI `sparse_autoencoder` state dict (`.pt`): `pre_bias`, `encoder.weight (d_sae, d_in)`, `latent_bias`,
  `decoder.weight (d_in, d_sae)`, `activation = "TopK"` with `activation_state_dict = {"k": ...}`; TopK SAEs
  of that library normalise their input (it keys normalisation on the activation being TopK).
- SAELens folder: `cfg.json` (`d_in`, `d_sae`, `k` or `activation_fn_kwargs.k`, `normalize_activations`,
  `apply_b_dec_to_input`) + `sae_weights.safetensors`. Our own SAEs are written in this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.core.integrity import sha256_file
from pipelines.errors import InputError

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
NORMALIZATIONS = ("none", "layer_norm")
HUB_PREFIX = "hf:"


def normalize_input(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenAI's `LN`: centre, divide by (unbiased std + eps); returns (normalised, mean, std)."""
    mean = x.mean(dim=-1, keepdim=True)
    centered = x - mean
    std = centered.std(dim=-1, keepdim=True)
    return centered / (std + eps), mean, std


@dataclass(frozen=True)
class TopKEncoding:
    values: torch.Tensor
    """(..., k) activations of the k largest latents after ReLU (some may be 0)."""
    ids: torch.Tensor
    """(..., k) latent ids."""


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, normalize: str = "layer_norm"):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise InputError(f"SAE k ({k}) must be between 1 and its width ({d_sae}).")
        if normalize not in NORMALIZATIONS:
            raise InputError(
                f"SAE input normalisation {normalize!r} is not supported; use one of {NORMALIZATIONS}."
            )
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


# --- formats -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedSAE:
    sae: TopKSAE
    format: str
    """`openai` or `saelens`."""
    spec: str
    weights_sha256: str


def load_sae(spec: str) -> LoadedSAE:
    """An SAE from an OpenAI `.pt` state dict, a SAELens folder, or `hf:REPO[/SUBFOLDER]` on the hub."""
    path = _resolve(spec)
    if path.is_dir():
        if not (path / SAELENS_CONFIG).exists() or not (path / SAELENS_WEIGHTS).exists():
            raise InputError(_unknown_format(spec))
        return LoadedSAE(_load_saelens(path), "saelens", spec, sha256_file(path / SAELENS_WEIGHTS))
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return LoadedSAE(_load_openai(path), "openai", spec, sha256_file(path))
    if not path.exists():
        raise InputError(f"SAE `{spec}` does not exist. Set `sae.path` to an SAE file or folder.")
    raise InputError(_unknown_format(spec))


def save_saelens(sae: TopKSAE, folder: Path, extra_config: dict | None = None) -> Path:
    """Write `sae` as a SAELens folder that `load_sae` (and SAELens) read back."""
    from pipelines.core.files import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in sae.named_parameters()}
    save_safetensors(tensors, folder / SAELENS_WEIGHTS)
    config = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "activation_fn_kwargs": {"k": sae.k},
        "normalize_activations": sae.normalize,
        "apply_b_dec_to_input": True,
        "dtype": "float32",
        **(extra_config or {}),
    }
    (folder / SAELENS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def openai_state_dict(sae: TopKSAE) -> dict:
    """The same SAE in OpenAI's `sparse_autoencoder` layout (for tests and interchange)."""
    if sae.normalize != "layer_norm":
        raise ValueError("OpenAI TopK SAEs always normalise their input")
    return {
        "pre_bias": sae.b_dec.detach().clone(),
        "encoder.weight": sae.W_enc.detach().t().contiguous(),
        "latent_bias": sae.b_enc.detach().clone(),
        "decoder.weight": sae.W_dec.detach().t().contiguous(),
        "activation": "TopK",
        "activation_state_dict": {"k": sae.k, "postact_fn": "ReLU"},
    }


def _load_openai(path: Path) -> TopKSAE:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as a torch state dict ({exc}). {_accepted()}") from None
    needed = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise InputError(_unknown_format(str(path)))
    if state.get("activation") != "TopK":
        raise InputError(
            f"{path}: activation {state.get('activation')!r} is not TopK; only TopK SAEs are supported."
        )
    d_sae, d_in = state["encoder.weight"].shape
    sae = TopKSAE(d_in, d_sae, int(state["activation_state_dict"]["k"]), normalize="layer_norm")
    with torch.no_grad():
        sae.W_enc.copy_(state["encoder.weight"].t())
        sae.b_enc.copy_(state["latent_bias"])
        sae.W_dec.copy_(state["decoder.weight"].t())
        sae.b_dec.copy_(state["pre_bias"])
    return sae


def _load_saelens(folder: Path) -> TopKSAE:
    from safetensors.torch import load_file

    config = json.loads((folder / SAELENS_CONFIG).read_text())
    k = config.get("k") or (config.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise InputError(f"{folder / SAELENS_CONFIG}: no `k`; only TopK SAEs are supported.")
    normalize = config.get("normalize_activations") or "none"
    if not config.get("apply_b_dec_to_input", True):
        raise InputError(f"{folder / SAELENS_CONFIG}: `apply_b_dec_to_input = false` is not supported.")
    sae = TopKSAE(int(config["d_in"]), int(config["d_sae"]), int(k), normalize=normalize)
    sae.load_state_dict({name: t.float() for name, t in load_file(str(folder / SAELENS_WEIGHTS)).items()})
    return sae


def _resolve(spec: str) -> Path:
    if not spec.startswith(HUB_PREFIX):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    parts = spec.removeprefix(HUB_PREFIX).split("/")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        # `inner` is a folder (SAELens) or a file (an OpenAI `.pt`); fetch only that.
        root = snapshot_download(repo_id, allow_patterns=[inner, f"{inner}/*"] if inner else ["*"])
    except Exception as exc:
        raise InputError(f"Cannot download SAE `{spec}` from the HuggingFace hub ({exc}).") from None
    return Path(root) / inner


def _accepted() -> str:
    return (
        "Accepted: an OpenAI sparse_autoencoder state dict (.pt) or a SAELens folder "
        f"({SAELENS_CONFIG} + {SAELENS_WEIGHTS}), locally or as hf:REPO[/SUBFOLDER]."
    )


def _unknown_format(spec: str) -> str:
    return f"SAE `{spec}` is in no format cocomix reads. {_accepted()}"

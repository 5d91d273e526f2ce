"""SAE file formats: each published layout read into one of cocomix's SAE modules, and the SAELens folder
that `train-sae` writes.

Layouts (`LAYOUTS`), each checked against the code of the library that writes it:
- `openai`: OpenAI `sparse_autoencoder` state dict (`.pt`): `pre_bias`, `encoder.weight (d_sae, d_in)`,
  `latent_bias`, `decoder.weight (d_in, d_sae)`, `activation = "TopK"` with `activation_state_dict = {"k":
  ...}`; TopK SAEs of that library normalise their input (it keys normalisation on the activation being TopK).
- `saelens`: a folder of `cfg.json` + `sae_weights.safetensors` (`W_enc`, `b_enc`, `W_dec`, `b_dec`, and
  `threshold` for `jumprelu`). `cfg.json` gives `architecture` (`topk`, `standard` = ReLU, `jumprelu`; SAELens
  before 6.0 wrote `standard` with `activation_fn_str = "topk"` for TopK), `d_in`, `d_sae`, `k` (or
  `activation_fn_kwargs.k`), `normalize_activations`, `apply_b_dec_to_input`. Our own SAEs are written so.
- `gemmascope`: Gemma Scope's `params.npz` (or a folder holding it): `W_enc (d_in, d_sae)`, `W_dec (d_sae,
  d_in)`, `b_enc`, `b_dec`, `threshold`; JumpReLU without `- b_dec` on the input (as SAELens' `gemma_2`
  converter sets `apply_b_dec_to_input = false`).
- `sparsify`: EleutherAI sparsify's folder of `cfg.json` (`d_in`, `k`, `num_latents` or `expansion_factor`,
  `activation`, `transcode`, ...) + `sae.safetensors` (`encoder.weight (d_sae, d_in)`, `encoder.bias`,
  `W_dec (d_sae, d_in)`, `b_dec`); encoding `TopK(ReLU(encoder(x - b_dec)))`. Its optional `W_skip` only adds
  to the reconstruction, so it is not read: latents and their decoder rows are all that targets use.
Specs: a local path, `hf:REPO[/PATH]` or `saelens:RELEASE/SAE_ID` (`pipelines.sae.sources`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.core.integrity import sha256_file
from pipelines.errors import InputError, first_line
from pipelines.sae.base import SparseAutoencoder
from pipelines.sae.families import sae_class, saelens_architectures
from pipelines.sae.jumprelu_sae import JumpReLUSAE
from pipelines.sae.sources import resolve_sae_source
from pipelines.sae.topk_sae import TopKSAE

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
OPENAI_SUFFIXES = (".pt", ".pth", ".bin")
LAYOUTS = ("openai", "saelens", "gemmascope", "sparsify")

SAE = SparseAutoencoder
"""Any SAE cocomix loads: one of the families of `pipelines.sae.families`."""


@dataclass(frozen=True)
class LoadedSAE:
    sae: SAE
    format: str
    """One of `LAYOUTS`."""
    spec: str
    weights_sha256: str


def load_sae(spec: str) -> LoadedSAE:
    """An SAE in any of `LAYOUTS`, from a local path, `hf:REPO[/PATH]` or `saelens:RELEASE/SAE_ID`."""
    source = resolve_sae_source(spec)
    path = source.path
    if path.is_dir():
        if (path / SAELENS_CONFIG).exists() and (path / SAELENS_WEIGHTS).exists():
            sae = _load_saelens(path, source.cfg_overrides)
            return LoadedSAE(sae, "saelens", spec, sha256_file(path / SAELENS_WEIGHTS))
        if (path / SPARSIFY_CONFIG).exists() and (path / SPARSIFY_WEIGHTS).exists():
            return LoadedSAE(_load_sparsify(path), "sparsify", spec, sha256_file(path / SPARSIFY_WEIGHTS))
        if (path / GEMMA_SCOPE_PARAMS).exists():
            path = path / GEMMA_SCOPE_PARAMS
        else:
            raise InputError(_unknown_format(spec))
    if path.is_file() and path.suffix == ".npz":
        return LoadedSAE(_load_gemma_scope(path), "gemmascope", spec, sha256_file(path))
    if path.is_file() and path.suffix in OPENAI_SUFFIXES:
        return LoadedSAE(_load_openai(path), "openai", spec, sha256_file(path))
    if not path.exists():
        raise InputError(f"SAE `{spec}` does not exist. Set `sae.path` to an SAE file or folder.")
    raise InputError(_unknown_format(spec))


def save_saelens(sae: SAE, folder: Path, extra_config: dict | None = None) -> Path:
    """Write `sae` as a SAELens folder that `load_sae` (and SAELens) read back."""
    from pipelines.core.files import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(sae.saelens_tensors(), folder / SAELENS_WEIGHTS)
    config = sae.saelens_config()
    config = {**config, "dtype": "float32", **(extra_config or {})}
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


# --- readers ----------------------------------------------------------------------------------------------


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


def _load_saelens(folder: Path, cfg_overrides: dict[str, Any]) -> SAE:
    from safetensors.torch import load_file

    where = folder / SAELENS_CONFIG
    config = {**json.loads(where.read_text()), **cfg_overrides}
    architecture, k = _saelens_architecture(config, where)
    for flag in ("finetuning_scaling_factor", "rescale_acts_by_decoder_norm"):
        if config.get(flag):
            raise InputError(f"{where}: `{flag} = true` is not supported.")
    family = sae_class(saelens_architectures()[architecture])
    sae = family.from_saelens_config({**config, "k": k}, where)
    tensors = load_file(str(folder / SAELENS_WEIGHTS))
    if "log_threshold" in tensors and "threshold" not in tensors:  # a SAELens training checkpoint
        tensors["threshold"] = tensors.pop("log_threshold").float().exp()
    _fill(sae, tensors, folder / SAELENS_WEIGHTS)
    return sae


def _saelens_architecture(config: dict[str, Any], where: Path) -> tuple[str, int | None]:
    """(the SAELens architecture, one of `saelens_architectures()`, k) from a SAELens cfg.json of any
    version."""
    architecture = config.get("architecture") or "standard"
    activation = config.get("activation_fn_str") or config.get("activation_fn")
    k = config.get("k") or (config.get("activation_fn_kwargs") or {}).get("k")
    if architecture == "standard" and (activation == "topk" or activation is None and k is not None):
        architecture = "topk"
    if architecture not in saelens_architectures():
        raise InputError(
            f"{where}: SAELens architecture {architecture!r} is not supported; cocomix reads "
            f"{', '.join(saelens_architectures())}. {_accepted()}"
        )
    if architecture == "topk" and k is None:
        raise InputError(f"{where}: a TopK SAE without `k`.")
    if architecture != "topk" and activation not in (None, "relu"):
        raise InputError(f"{where}: activation {activation!r} is not supported; cocomix reads `relu`.")
    return architecture, k


def _load_gemma_scope(path: Path) -> JumpReLUSAE:
    import numpy as np

    try:
        with np.load(path) as data:
            # SAELens' `gemma_2` converter also accepts `w_enc`/`w_dec`.
            arrays = {("W_" + key[2:] if key.startswith("w_") else key): data[key] for key in data.files}
    except Exception as exc:
        raise InputError(_unknown_format(str(path), f"numpy cannot read it ({first_line(exc)})")) from None
    needed = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise InputError(
            f"{path} has no {', '.join(f'`{m}`' for m in missing)}: a Gemma Scope params.npz holds "
            f"{', '.join(needed)}."
        )
    d_in, d_sae = arrays["W_enc"].shape
    sae = JumpReLUSAE(d_in, d_sae, normalize="none", apply_b_dec_to_input=False)
    _fill(sae, {name: torch.from_numpy(np.asarray(arrays[name])) for name in needed}, path)
    return sae


def _load_sparsify(folder: Path) -> TopKSAE:
    from safetensors.torch import load_file

    where = folder / SPARSIFY_CONFIG
    config = json.loads(where.read_text())
    if config.get("transcode"):
        raise InputError(
            f"{where}: a sparsify transcoder, not an SAE; its latents do not decode to its input."
        )
    if config.get("activation", "topk") != "topk" or config.get("signed"):
        raise InputError(f"{where}: only sparsify's unsigned `topk` activation is supported.")
    d_in, k = int(config["d_in"]), int(config["k"])
    # sparsify's own rule, with its config's defaults (num_latents 0, expansion_factor 32).
    d_sae = int(config.get("num_latents") or d_in * config.get("expansion_factor", 32))
    tensors = load_file(str(folder / SPARSIFY_WEIGHTS))
    names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}
    missing = [theirs for theirs in names.values() if theirs not in tensors]
    if missing:
        raise InputError(f"{folder / SPARSIFY_WEIGHTS} lacks {', '.join(missing)}.")
    ours = {name: tensors[theirs] for name, theirs in names.items()}
    ours["W_enc"] = ours["W_enc"].t()
    sae = TopKSAE(d_in, d_sae, k, normalize="none")
    _fill(sae, ours, folder / SPARSIFY_WEIGHTS)
    return sae


def _fill(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy `tensors` into `sae` as float32; names and shapes must match its parameters exactly."""
    params = dict(sae.named_parameters())
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise InputError(
            f"{where}: tensors do not match a {sae.architecture} SAE (missing {missing or 'none'}, "
            f"unexpected {extra or 'none'})."
        )
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise InputError(
                f"{where}: `{name}` has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)} "
                f"for d_in {sae.d_in}, d_sae {sae.d_sae}."
            )
    sae.load_state_dict({name: t.float() for name, t in tensors.items()})


def _accepted() -> str:
    return (
        "Accepted: an OpenAI sparse_autoencoder TopK state dict (.pt); a SAELens folder "
        f"({SAELENS_CONFIG} + {SAELENS_WEIGHTS}; architecture {', '.join(saelens_architectures())}); a "
        f"Gemma Scope {GEMMA_SCOPE_PARAMS} or a folder holding one; an EleutherAI sparsify folder "
        f"({SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS}); each locally, as hf:REPO[/PATH] or as "
        "saelens:RELEASE/SAE_ID."
    )


def _unknown_format(spec: str, why: str = "") -> str:
    return f"SAE `{spec}` is in no format cocomix reads{': ' + why if why else ''}. {_accepted()}"

"""Model folders on disk: `config.json` + `model.safetensors`, ours or a transformers export.

A saved folder round-trips exactly. `load_model` also reads the folders `hf_export` writes (a
`CocomixForCausalLM` or, for NTP students, a `GPT2LMHeadModel`), so an exported or downloaded student
loads back into cocomix with the same weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pipelines.core.files import atomic_write_json, save_safetensors
from pipelines.errors import InputError
from pipelines.model.gpt import GPT, ModelConfig

MODEL_FORMAT = "cocomix-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: GPT, folder: Path, extra: dict | None = None) -> Path:
    """Weights + config; `extra` (e.g. the tokenizer's document separator) is stored in config.json too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_safetensors(state, folder / WEIGHTS_FILE, metadata={"format": MODEL_FORMAT})
    atomic_write_json(
        folder / CONFIG_FILE,
        {"format": MODEL_FORMAT, "model": dataclasses.asdict(model.config), **(extra or {})},
    )
    return folder


def model_folder(path: Path) -> Path:
    """A model folder, or a `pretrain-*` stage folder standing for the `model/` inside it."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists() and (path / "model" / CONFIG_FILE).exists():
        return path / "model"
    return path


def load_model(folder: Path, device: str | torch.device = "cpu") -> GPT:
    from safetensors.torch import load_file

    folder = model_folder(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.exists() or not weights_path.exists():
        raise InputError(f"{folder} is not a cocomix model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
    meta = json.loads(config_path.read_text())
    if meta.get("model_type") not in TRANSFORMERS_LOADERS and meta.get("format") != MODEL_FORMAT:
        raise InputError(
            f"{config_path} is not a cocomix student: neither a cocomix model config (format "
            f"{MODEL_FORMAT!r}) nor a transformers export (model_type {' or '.join(TRANSFORMERS_LOADERS)}); "
            f"it has format {meta.get('format')!r}, model_type {meta.get('model_type')!r}."
        )
    state = load_file(str(weights_path), device="cpu")
    if meta.get("model_type") in TRANSFORMERS_LOADERS:
        config, state = TRANSFORMERS_LOADERS[meta["model_type"]](meta, state)
    else:
        config = ModelConfig.from_dict(meta["model"])
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device)


def saved_separator(folder: Path) -> tuple[str | None, int | None]:
    """The document separator (token, id) a student was trained with, as its folder records it: ours in
    config.json's `tokenizer`, an export as its BOS token. (None, None) when the folder does not say."""
    folder = model_folder(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if "tokenizer" in meta:
        return meta["tokenizer"].get("separator"), meta["tokenizer"].get("separator_id")
    tokenizer_config = folder / "tokenizer_config.json"
    token = json.loads(tokenizer_config.read_text()).get("bos_token") if tokenizer_config.exists() else None
    return (token if isinstance(token, str) else None), meta.get("bos_token_id")


def _from_cocomix_export(meta: dict, state: dict) -> tuple[ModelConfig, dict]:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in meta.items() if k in fields})
    return config, {k.removeprefix("transformer."): v for k, v in state.items()}


def _from_gpt2_export(meta: dict, state: dict) -> tuple[ModelConfig, dict]:
    """The inverse of `hf_export.export_hf_gpt2` (GPT-2's Conv1D weights are stored transposed)."""
    if meta.get("activation_function", "gelu_new") != "gelu_new":
        raise InputError(
            f"GPT-2 folder with activation {meta['activation_function']!r}: students use gelu_new."
        )
    config = ModelConfig(
        variant="ntp",
        vocab_size=meta["vocab_size"],
        context_length=meta["n_positions"],
        n_layer=meta["n_layer"],
        n_head=meta["n_head"],
        n_embd=meta["n_embd"],
        layer_norm_eps=meta.get("layer_norm_epsilon", 1e-5),
    )
    ours = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the tied head, GPT-2's mask buffers
        name = name.removeprefix("transformer.")
        is_conv1d = name.endswith(".weight") and any(p in name for p in ("c_attn", "c_proj", "c_fc"))
        ours[name] = tensor.t().contiguous() if is_conv1d else tensor
    return config, ours


TRANSFORMERS_LOADERS = {"cocomix": _from_cocomix_export, "gpt2": _from_gpt2_export}

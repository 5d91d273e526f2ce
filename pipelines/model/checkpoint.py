"""Model folders on disk: `config.json` + `model.safetensors`, and export of NTP models to transformers.

A saved folder round-trips exactly. An NTP student exports to a `GPT2LMHeadModel` folder that
`AutoModelForCausalLM.from_pretrained` loads with the same logits, so lm-eval's `hf` model, HF generate and
the rest of the ecosystem can use our baselines as they are.
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
    if meta.get("format") != MODEL_FORMAT:
        raise InputError(f"{config_path} is not a cocomix model config (format {meta.get('format')!r}).")
    model = GPT(ModelConfig.from_dict(meta["model"]))
    model.load_state_dict(load_file(str(weights_path), device="cpu"))
    return model.to(device)


def export_hf_gpt2(model: GPT, folder: Path, separator_id: int | None = None) -> Path:
    """Write an NTP student as a transformers `GPT2LMHeadModel` folder (Conv1D weights are transposed).

    `separator_id` (the token store's document separator) becomes the config's BOS and EOS id; without it
    they are left unset, since GPT2Config's default 50256 lies outside a smaller vocabulary.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = model.config
    if config.variant != "ntp":
        raise ValueError(f"only NTP models export to GPT2LMHeadModel, not {config.variant!r}")
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=config.layer_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=separator_id,
        eos_token_id=separator_id,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    state = {}
    for name, tensor in model.state_dict().items():
        is_conv1d = name.endswith(".weight") and any(p in name for p in ("c_attn", "c_proj", "c_fc"))
        state[f"transformer.{name}"] = tensor.t().contiguous() if is_conv1d else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # GPT-2 registers non-persistent attention buffers; anything else missing would be a real gap.
    if unexpected or [m for m in missing if not m.endswith((".attn.bias", ".attn.masked_bias"))]:
        raise RuntimeError(f"GPT-2 export mismatch: missing {missing}, unexpected {unexpected}")
    hf_model.save_pretrained(str(folder))
    return Path(folder)

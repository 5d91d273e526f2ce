"""Students as transformers folders (`cocomix export`, and `hf/` beside every pretrain stage's `model/`), and
their upload to the HuggingFace hub.

- An NTP student becomes a `GPT2LMHeadModel` folder: the same math, so nothing but transformers is needed.
- A CoCoMix or pause student becomes a `CocomixForCausalLM` folder: weights, a config with `auto_map`, and
  this package's `gpt.py`, `configuration_cocomix.py` and `modeling_cocomix.py` copied byte for byte, so
  `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` runs the code cocomix runs.
Every folder holds the student's tokenizer (`AutoTokenizer` loads it; BOS and EOS are the document
separator the student was trained with) and loads back into cocomix with `load_model`.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.errors import InputError
from pipelines.model.checkpoint import load_model, model_folder, saved_separator
from pipelines.model.gpt import GPT

# Copied into CoCoMix and pause exports: the modeling file and what it imports, relative to this package.
REMOTE_CODE_FILES = ("gpt.py", "configuration_cocomix.py", "modeling_cocomix.py")
AUTO_MAP = {
    "AutoConfig": "configuration_cocomix.CocomixConfig",
    "AutoModelForCausalLM": "modeling_cocomix.CocomixForCausalLM",
}
TOKEN_HELP = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"


@dataclass(frozen=True)
class Separator:
    token: str | None
    id: int | None


def export_student(model_dir: Path, out: Path) -> Path:
    """Export the student at `model_dir` (a model folder or a `pretrain-*` stage folder) to `out`, which
    is replaced whole; returns `out`."""
    source = model_folder(Path(model_dir))
    model = load_model(source)
    separator = Separator(*saved_separator(source))
    tokenizer_file = source / "tokenizer.json"
    if not tokenizer_file.exists():
        raise InputError(
            f"{source} has no tokenizer.json: export needs the tokenizer the student was trained with."
        )
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with _no_progress_bars():  # a bar per shard would cut into the caller's own progress output
        if model.config.variant == "ntp":
            export_hf_gpt2(model, staging, separator.id)
        else:
            export_hf_cocomix(model, staging, separator.id)
    _save_tokenizer(tokenizer_file, separator, staging)
    (staging / "README.md").write_text(_model_card(model, out.name))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def export_hf_cocomix(model: GPT, folder: Path, separator_id: int | None = None) -> Path:
    """Write a student as a `CocomixForCausalLM` folder with its remote code (any variant; NTP students
    export to GPT-2 instead, in `export_student`)."""
    from pipelines.model.configuration_cocomix import CocomixConfig
    from pipelines.model.modeling_cocomix import CocomixForCausalLM

    folder = Path(folder)
    config = CocomixConfig(**asdict(model.config), bos_token_id=separator_id, eos_token_id=separator_id)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["CocomixForCausalLM"]
    hf_model = CocomixForCausalLM(config)
    hf_model.transformer.load_state_dict(model.state_dict())
    hf_model.save_pretrained(str(folder))
    here = Path(__file__).parent
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(here / name, folder / name)
    return folder


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


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _save_tokenizer(tokenizer_file: Path, separator: Separator, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": separator.token, "eos_token": separator.token} if separator.token else {}
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **special).save_pretrained(str(folder))


def _model_card(model: GPT, name: str) -> str:
    config = model.config
    remote = config.variant != "ntp"
    load = (
        f'AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)'
        if remote
        else f'AutoModelForCausalLM.from_pretrained("{name}")'
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cocomix]",
        "---",
        f"# {name}",
        "",
        f"A `{config.variant}` student trained with cocomix "
        "([LLM Pretraining with Continuous Concepts](https://arxiv.org/abs/2502.08524), Tack et al., 2025): "
        f"{config.n_layer} layers, width {config.n_embd}, context {config.context_length}"
        + (
            f", {config.n_concepts} concepts (top {config.concept_k} kept)"
            if config.variant == "cocomix"
            else ""
        )
        + ".",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
    ]
    if remote:
        lines += [
            "",
            "The modeling code (`modeling_cocomix.py`, `configuration_cocomix.py`, `gpt.py`) is "
            "cocomix's own. Where cocomix is installed, `import pipelines.model` registers it and "
            "`trust_remote_code` is not needed."
            + (
                " The output's `concept_logits` holds the predicted concept logits."
                if config.variant == "cocomix"
                else ""
            ),
        ]
    return "\n".join(lines) + "\n"


# --- the hub ----------------------------------------------------------------------------------------------


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """The files `push_to_hub` uploads, as (path inside the repo, bytes), sorted."""
    folder = Path(folder)
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` (a model repo) if needed and upload `folder` to it; returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise InputError(f"--push-to-hub {repo_id} needs a HuggingFace token: {TOKEN_HELP}.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message="Upload cocomix student",
        )
    except Exception as exc:  # network, permissions, a bad repo id: the hub's own message
        raise InputError(f"Cannot upload {folder} to the hub as {repo_id}: {exc}") from None
    return str(getattr(commit, "commit_url", commit))

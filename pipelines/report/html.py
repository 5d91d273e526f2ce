"""The run's page, `report.html`: one self-contained file (inline CSS and SVG, nothing loaded from the
network) that opens from disk and from a copied run folder, rendered with Jinja2 from
`templates/report.html.j2`.

It shows what `summary.json` and `report.md` hold (nothing of theirs is left out: the summary is also
embedded whole, as JSON, for a reader's own scripts), as pictures where people would rather look: the
forest plot of every paired difference, the loss curves; the run's concept dictionary, a page per concept
(its contexts, the histogram of its activations, where the student predicts it on the steering demo's
prompts and the demo's sweep of it); and the run's plan. It reads without script; one inline script only
searches and sorts the concepts' list. Links to the run's files are relative, so the page works wherever the
run folder is. The same inputs give the same bytes: no date, sorted JSON, charts with fixed ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pipelines.sae.dictionary import split_context

TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class PairedRow:
    """A paired difference as the page lists it beside the forest plot."""

    baseline: str
    student: str
    metric: str
    difference: str
    interval: str
    seeds: str
    verdict: str


@dataclass(frozen=True)
class StageRow:
    """A stage of the run: its state, wall time and the settings that enter its fingerprint, and from the
    plan what it makes, what the next `cocomix run` would do with it and the command that makes it alone."""

    name: str
    status: str
    wall: str
    settings: Sequence[tuple[str, str]]
    detail: str = ""
    action: str = ""
    command: str = ""
    linked: bool = True  # its folder exists, so the page links it


@dataclass(frozen=True)
class Page:
    """Everything the template shows, already formatted: the report stage fills it from the summary."""

    title: str
    students: list[str]
    student_rows: Sequence[tuple[str, list[str]]]
    paired: Sequence[PairedRow]
    forest_svg: str
    loss_svg: str
    speed_rows: Sequence[tuple[str, str, str, str]]
    skipped: Sequence[str]
    stages: Sequence[StageRow]
    steering: Sequence[dict[str, Any]]
    config_toml: str
    summary: dict[str, Any]
    concepts: Sequence[Concept] = ()
    concept_tokens: int = 0
    concepts_left_out: int = 0  # past `report.max_concepts`

    @cached_property
    def concept_ids(self) -> frozenset[int]:
        """The concepts that have a page: a link to any other would go nowhere."""
        return frozenset(c.id for c in self.concepts)


@dataclass(frozen=True)
class Context:
    before: str
    token: str
    after: str
    activation: float


@dataclass(frozen=True)
class Histogram:
    """A concept's activations as a small inline SVG: one bar per log-spaced bin, all bars one `path` (a
    page holds thousands of them, so each is a few hundred bytes)."""

    path: str  # the bars, in a WIDTH x HEIGHT box, counts scaled to the tallest bar
    ticks: Sequence[tuple[float, str]]  # (x, activation) under the bars: first edge, middle, last edge
    total: int
    tallest: int

    WIDTH = 360
    HEIGHT = 80
    MIN_BINS = 16


def histogram_of(stored: dict[str, Any] | None) -> Histogram | None:
    """The bars of a dictionary entry's `histogram` (`pipelines.sae.dictionary`); None for a dictionary
    built before it kept one."""
    if not stored:
        return None
    counts, first, per_octave = stored["counts"], stored["first_bin"], stored["bins_per_octave"]
    # At least MIN_BINS wide, the filled bins centred: a latent active in one bin gets a bar, not a block.
    shown = max(len(counts), Histogram.MIN_BINS)
    pad = (shown - len(counts)) // 2
    width = Histogram.WIDTH / shown
    tallest = max(counts)
    bars = []
    for i, count in enumerate(counts, start=pad):
        if count:
            height = max(Histogram.HEIGHT * count / tallest, 0.5)  # a bin of one still shows
            bars.append(
                f"M{_num(i * width)} {Histogram.HEIGHT}v{_num(-height)}h{_num(width * 0.9)}v{_num(height)}z"
            )
    ticks = [
        (round(i * width, 1), f"{2 ** ((first - pad + i) / per_octave):.3g}") for i in (0, shown // 2, shown)
    ]
    return Histogram("".join(bars), ticks, sum(counts), tallest)


def _num(x: float) -> str:
    """A coordinate to a tenth, without a trailing ".0": the paths are most of a histogram's bytes."""
    return f"{x:.1f}".removesuffix(".0")


@dataclass(frozen=True)
class PromptToken:
    """A demo prompt's token, and the concept's rank (1 = strongest) and logit among the student's top
    concepts after it, when it is among them."""

    token: str
    rank: int | None
    logit: float | None


@dataclass(frozen=True)
class Concept:
    """A latent of the run's concept dictionary as the page shows it: in the searchable list, and on its own
    page (`#concept-ID`, shown alone by CSS `:target`, so it needs no script)."""

    id: int
    label: str
    frequency: float
    target_frequency: float
    top_tokens: Sequence[tuple[str, float]]
    contexts: Sequence[Context]
    histogram: Histogram | None = None
    # Per demo prompt where the student predicts it (`steer --inspect`): the prompt's tokens.
    predicted: Sequence[tuple[str, Sequence[PromptToken]]] = ()
    steered: Sequence[dict[str, Any]] = ()  # the steering demos that swept this concept

    @property
    def search_text(self) -> str:
        """What the search box matches: the label, the top tokens and the contexts, lower case."""
        words = [self.label, *(t for t, _ in self.top_tokens)]
        words += [c.before + c.token + c.after for c in self.contexts]
        return " ".join(words).lower()


def concepts_of(dictionary: dict[str, Any], steering: Sequence[dict[str, Any]] = ()) -> list[Concept]:
    """The dictionary's latents, the most often targeted first (ties by id), each with what the steering
    demos (`report._steering_demo`'s rows, with the student's `inspect` rows) show of it."""
    concepts = []
    for entry in dictionary.get("latents", {}).values():
        contexts = []
        for context in entry["contexts"]:
            contexts.append(Context(*split_context(context["text"]), context["activation"]))
        concepts.append(
            Concept(
                id=entry["id"],
                label=entry["label"],
                frequency=entry["frequency"],
                target_frequency=entry["target_frequency"],
                # A whitespace token as its repr ('\n'), as the label shows it: blank it reads as nothing.
                top_tokens=[
                    (t["token"] if t["token"].strip() else repr(t["token"]), t["activation"])
                    for t in entry["top_tokens"]
                ],
                contexts=contexts,
                histogram=histogram_of(entry.get("histogram")),
                predicted=_predicted(steering, entry["id"]),
                steered=[demo for demo in steering if demo["concept"] == entry["id"]],
            )
        )
    return sorted(concepts, key=lambda c: (-c.target_frequency, c.id))


def _predicted(steering: Sequence[dict[str, Any]], concept_id: int) -> list[tuple[str, list[PromptToken]]]:
    """The demo prompts after some token of which the student has the concept among its top concepts."""
    by_prompt = [(demo["prompt"], prompt_tokens(demo["inspect"], concept_id)) for demo in steering]
    return [(prompt, tokens) for prompt, tokens in by_prompt if any(t.rank for t in tokens)]


def prompt_tokens(inspect: Sequence[dict[str, Any]], concept_id: int) -> list[PromptToken]:
    """A prompt's tokens (`steer --inspect` rows), each with the concept's rank and logit where the student
    has it among its top concepts."""
    tokens = []
    for row in inspect:
        ids = [c["id"] for c in row["concepts"]]
        rank = ids.index(concept_id) + 1 if concept_id in ids else None
        logit = row["concepts"][rank - 1]["logit"] if rank else None
        tokens.append(PromptToken(row["token"], rank, logit))
    return tokens


def inline_svg(svg: bytes) -> str:
    """A matplotlib SVG file as an element to embed: its XML declaration and DOCTYPE dropped."""
    text = svg.decode("utf-8")
    return text[text.index("<svg") :].strip()


def render(page: Page) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipelines.report", "templates"),
        autoescape=True,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    # In a <script> element a "</" would end it early; escaped as JSON's \uXXXX, "<", ">" and "&" leave the
    # page well-formed markup for any parser, and JSON.parse reads the same text.
    summary_json = json.dumps(page.summary, indent=1, sort_keys=True)
    for char in "<>&":
        summary_json = summary_json.replace(char, f"\\u{ord(char):04x}")
    return env.get_template(TEMPLATE).render(page=page, summary_json=summary_json)

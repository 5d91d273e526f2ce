"""The run's page, `report.html`: one self-contained file (inline CSS and SVG, nothing loaded from the
network) that opens from disk and from a copied run folder, rendered with Jinja2 from
`templates/report.html.j2`.

It shows what `summary.json` and `report.md` hold (nothing of theirs is left out: the summary is also
embedded whole, as JSON, for a reader's own scripts), as pictures where people would rather look: the
forest plot of every paired difference, the loss curves; and the run's concept dictionary, a page per
concept. It reads without script; one inline script only searches and sorts the concepts' list. Links to
the run's files are relative, so the page works wherever the run folder is. The same inputs give the same
bytes: no date, sorted JSON, charts with fixed ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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
    """A stage of the run: its state, wall time and the settings that enter its fingerprint."""

    name: str
    status: str
    wall: str
    settings: Sequence[tuple[str, str]]


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


@dataclass(frozen=True)
class Context:
    before: str
    token: str
    after: str
    activation: float


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

    @property
    def search_text(self) -> str:
        """What the search box matches: the label, the top tokens and the contexts, lower case."""
        words = [self.label, *(t for t, _ in self.top_tokens)]
        words += [c.before + c.token + c.after for c in self.contexts]
        return " ".join(words).lower()


def concepts_of(dictionary: dict[str, Any]) -> list[Concept]:
    """The dictionary's latents, the most often targeted first (ties by id)."""
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
                top_tokens=[(t["token"], t["activation"]) for t in entry["top_tokens"]],
                contexts=contexts,
            )
        )
    return sorted(concepts, key=lambda c: (-c.target_frequency, c.id))


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

"""The run's page, `report.html`: one self-contained file (inline CSS and SVG, no script, nothing loaded from
the network) that opens from disk and from a copied run folder, rendered with Jinja2 from
`templates/report.html.j2`.

It shows what `summary.json` and `report.md` hold (nothing of theirs is left out: the summary is also
embedded whole, as JSON, for a reader's own scripts), as pictures where people would rather look: the
forest plot of every paired difference, the loss curves. Links to the run's files are relative, so the page
works wherever the run folder is. The same inputs give the same bytes: no date, sorted JSON, charts with
fixed ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    stages: Sequence[tuple[str, str, str]]
    steering: Sequence[dict[str, Any]]
    config_toml: str
    summary: dict[str, Any]


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

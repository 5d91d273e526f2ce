"""Charts drawn with matplotlib (Agg), as PNG or SVG: the loss curves (`pretrain`'s per student, the `run`
report's of every student) and the report page's forest plot of paired differences.

This module owns how a chart looks (size, resolution, style, legend) and that the same points give the same
bytes, so an unchanged run rewrites an identical file: matplotlib's default style rather than the user's
matplotlibrc, a fixed size, no version or date in the metadata, and a fixed salt for the ids of an SVG.
Matplotlib is imported inside the functions, so that `cocomix --help` does not pay for it, and no pyplot
state is touched.

How the curves are told apart: one colour per student, a line style per kind (train solid, val dashed with
its points marked), so that a student's two curves read as one student. A second panel zooms on the last
half of the steps, where the students' curves crowd.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.files import atomic_write_bytes

WIDTH_PX, HEIGHT_PX, DPI = 1000, 480, 100
KIND_STYLES = {"train": {"linestyle": "-"}, "val": {"linestyle": "--", "marker": "o", "markersize": 3}}
KIND_LABELS = {"train": "train (NTP loss)", "val": "val"}
LOSS_AXES = {"x_label": "optimizer step", "y_label": "loss (nats/token)"}  # every loss chart's
ZOOM_FROM = 0.5  # the zoom panel shows the steps from this fraction of the last step on
# SVG: ids from a fixed salt (the same bytes for the same chart), text as <text> (selectable, searchable,
# smaller than glyph paths, and readable by the page's tests).
SVG_RC = {"svg.hashsalt": "cocomix", "svg.fonttype": "none"}


@dataclass(frozen=True)
class Curve:
    """One line of a chart: its (x, y) points, and the (x, low, high) band shaded around it in its colour (the
    spread of a mean over seeds), empty for a single run."""

    points: Sequence[tuple[float, float]] = ()
    band: Sequence[tuple[float, float, float]] = ()

    def __post_init__(self):  # as tuples, so that equal curves compare equal however they were built
        object.__setattr__(self, "points", tuple(tuple(p) for p in self.points))
        object.__setattr__(self, "band", tuple(tuple(b) for b in self.band))


def loss_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, Curve]:
    """A student's curves from the rows of its training log (`metrics.jsonl`): `train`, the NTP part of the
    train loss (comparable across objectives), and `val`."""
    rows = list(rows)
    return {
        "train": Curve([(r["step"], r["ntp_loss"]) for r in rows if r.get("kind") == "train"]),
        "val": Curve([(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val"]),
    }


def write_loss_chart(
    path: Path, students: Mapping[str, Mapping[str, Curve]], *, x_label: str, y_label: str, title: str
) -> None:
    """`draw_loss_chart` written atomically to `path`, as PNG or SVG by its suffix."""
    image_format = Path(path).suffix.lstrip(".").lower()
    chart = draw_loss_chart(
        students, x_label=x_label, y_label=y_label, title=title, image_format=image_format
    )
    atomic_write_bytes(Path(path), chart)


def draw_loss_chart(
    students: Mapping[str, Mapping[str, Curve]],
    *,
    x_label: str,
    y_label: str,
    title: str,
    image_format: str = "png",
) -> bytes:
    """The chart of each student's curves by kind (`train`, `val`), as PNG or SVG bytes.

    A student's colour is its place in `students` (matplotlib's default cycle), so the order of the mapping,
    not the data, decides colours. Curves without points are left out, and a student with none is left out
    of the legend; a chart with no points at all says "no data". The zoom panel is drawn when some curve
    has points in the last half of the steps and the steps span more than one value.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    _check_format(image_format)
    drawn = {
        name: {kind: curve for kind, curve in curves.items() if curve.points}
        for name, curves in students.items()
    }
    colours = {name: f"C{i % 10}" for i, name in enumerate(students)}
    xs = [x for curves in drawn.values() for curve in curves.values() for x, _ in curve.points]
    zoom_start = ZOOM_FROM * max(xs) if xs else 0.0
    zoomed = len(set(xs)) > 1 and any(x >= zoom_start for x in xs)

    with _chart_style():
        fig = _figure(HEIGHT_PX / DPI)
        if zoomed:
            ax, zoom = fig.subplots(1, 2, width_ratios=[3, 2])
        else:
            ax, zoom = fig.add_subplot(), None
        for axes in (ax, zoom) if zoom is not None else (ax,):
            for name, curves in drawn.items():
                for kind, curve in curves.items():
                    _draw(axes, curve, colours[name], KIND_STYLES.get(kind, {}))
            axes.set_xlabel(x_label)
            axes.grid(True, alpha=0.3)
            if all(float(x).is_integer() for x in xs):
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5
        ax.set_ylabel(y_label)
        if zoom is not None:
            fig.suptitle(title)
            ax.set_title("all steps", loc="left", fontsize="medium")
            _zoom_limits(zoom, drawn, zoom_start, max(xs))
            zoom.set_title(f"zoom: steps {zoom_start:,.0f} to {max(xs):,.0f}", loc="left", fontsize="medium")
        else:
            ax.set_title(title)
        if xs:
            kinds = list(dict.fromkeys(kind for curves in drawn.values() for kind in curves))
            handles = [
                Line2D([], [], color=colours[name], linewidth=2, label=name) for name in drawn if drawn[name]
            ]
            handles += [
                Line2D([], [], color="black", label=KIND_LABELS.get(kind, kind), **KIND_STYLES.get(kind, {}))
                for kind in kinds
            ]
            ax.legend(handles=handles, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        return _encoded(fig, image_format)


def _draw(axes, curve: Curve, colour: str, style: dict) -> None:
    xs, ys = [p[0] for p in curve.points], [p[1] for p in curve.points]
    marker = style.get("marker") or ("o" if len(xs) == 1 else None)
    axes.plot(xs, ys, color=colour, linewidth=1.5, **{**style, "marker": marker})
    if curve.band:
        axes.fill_between(
            [b[0] for b in curve.band], [b[1] for b in curve.band], [b[2] for b in curve.band],
            color=colour, alpha=0.2, linewidth=0,
        )  # fmt: skip


def _zoom_limits(zoom, drawn: Mapping[str, Mapping[str, Curve]], start: float, stop: float) -> None:
    """The zoom panel's limits: the steps from `start` on, and the y range of the lines there (bands may leave
    the panel: the lines are what crowd)."""
    ys = [y for curves in drawn.values() for c in curves.values() for x, y in c.points if x >= start]
    low, high = min(ys), max(ys)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    zoom.set_xlim(start, stop + 0.02 * (stop - start or 1))
    zoom.set_ylim(low - margin, high + margin)


@dataclass(frozen=True)
class Difference:
    """One row of a forest plot: a paired difference (`comparison`, e.g. "cocomix - ntp", on `metric`), its
    95% interval (None with one seed) and the verdict in words."""

    comparison: str
    metric: str
    mean: float
    interval: tuple[float, float] | None
    verdict: str


def draw_forest_plot(rows: Sequence[Difference], *, title: str, image_format: str = "svg") -> bytes:
    """Each difference as a point with its interval on a horizontal line, one row each, top to bottom in
    order, a vertical line at 0 and the verdict at the right, coloured by it. Each metric gets a panel and an
    x axis of its own: a perplexity difference and an accuracy difference on one axis would flatten the
    accuracy. The same rows give the same bytes."""
    _check_format(image_format)
    by_metric: dict[str, list[tuple[int, Difference]]] = {}
    for index, row in enumerate(rows):
        by_metric.setdefault(row.metric, []).append((index, row))
    height_rows = sum(len(r) + 1.5 for r in by_metric.values()) or 1.5
    with _chart_style():
        fig = _figure(max(1.6, 0.32 * height_rows + 0.6))
        fig.suptitle(title)
        if not rows:
            ax = fig.add_subplot()
            ax.axis("off")
            ax.text(
                0.5, 0.5, "no paired differences (one student, or no baseline)", ha="center", color="grey"
            )
        else:
            axes = fig.subplots(
                len(by_metric), 1, squeeze=False, height_ratios=[len(r) + 1.5 for r in by_metric.values()]
            )
            for ax, (metric, group) in zip(axes[:, 0], by_metric.items(), strict=True):
                ys = list(range(len(group)))[::-1]
                for y, (index, row) in zip(ys, group, strict=True):
                    colour = {"better": "C2", "worse": "C3"}.get(row.verdict.split()[0], "0.35")
                    # ids `interval-N` and `difference-N` (N: the row's place in `rows`) for the page's tests
                    if row.interval is not None:
                        ax.plot(row.interval, [y, y], color=colour, linewidth=2, gid=f"interval-{index}")
                    ax.plot([row.mean], [y], "o", color=colour, markersize=6, gid=f"difference-{index}")
                    ax.annotate(
                        row.verdict, (1.0, y), xycoords=("axes fraction", "data"), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize="small", color=colour,
                    )  # fmt: skip
                ax.axvline(0.0, color="black", linewidth=0.8)
                ax.set_yticks(ys, [row.comparison for _, row in group])
                ax.set_ylim(-0.75, len(group) - 0.25)
                ax.set_title(metric, loc="left", fontsize="medium")
                ax.grid(True, axis="x", alpha=0.3)
        return _encoded(fig, image_format)


def _check_format(image_format: str) -> None:
    if image_format not in ("png", "svg"):
        raise ValueError(f"a chart is written as png or svg, not {image_format!r}")


@contextlib.contextmanager
def _chart_style() -> Iterator[None]:
    """matplotlib's default style rather than the user's matplotlibrc, and `SVG_RC`, for drawing and saving
    alike (the SVG settings are read when the figure is saved)."""
    import matplotlib
    import matplotlib.style

    matplotlib.use("Agg")
    with matplotlib.style.context("default"), matplotlib.rc_context(SVG_RC):
        yield


def _figure(height_inches: float):
    """A figure of the charts' width and resolution."""
    from matplotlib.figure import Figure

    return Figure(figsize=(WIDTH_PX / DPI, height_inches), dpi=DPI, layout="constrained")


def _encoded(fig, image_format: str) -> bytes:
    """`fig` as PNG or SVG bytes without what would change them between runs: the matplotlib version (PNG),
    the date and creator (SVG)."""
    buf = io.BytesIO()
    metadata = {"Software": None} if image_format == "png" else {"Date": None, "Creator": None}
    fig.savefig(buf, format=image_format, dpi=DPI, metadata=metadata)
    return buf.getvalue()

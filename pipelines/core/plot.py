"""Line charts as PNG files, drawn with matplotlib (Agg): the loss curves of `pretrain` and the `run` report.

This module owns how a chart looks (size, resolution, style, legend) and that the file is written atomically
and byte for byte the same for the same points, so an unchanged run rewrites an identical file. Matplotlib is
imported inside the function, so that `cocomix --help` does not pay for it, and no pyplot state is touched.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipelines.core.files import atomic_write_bytes

WIDTH_PX, HEIGHT_PX, DPI = 800, 480, 100


def line_chart(
    path: Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    x_label: str,
    y_label: str,
    title: str,
    bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None,
) -> None:
    """Draw each series of (x, y) points as a line named by its key in the legend; write `path` as a PNG.

    `bands` shades a (x, low, high) range around the series of the same name, in its colour (the spread of
    a mean over seeds). Series without points are left out (of the lines and the legend). The same arguments
    give the same bytes: matplotlib's default style rather than the user's matplotlibrc, a fixed size, no
    version in the metadata.
    """
    import matplotlib
    import matplotlib.style

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawn = {label: points for label, points in series.items() if points}
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        for label, points in drawn.items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            (line,) = ax.plot(xs, ys, label=label, linewidth=1.5, marker="o" if len(points) == 1 else None)
            band = (bands or {}).get(label)
            if band:
                ax.fill_between(
                    [b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                    color=line.get_color(), alpha=0.2, linewidth=0,
                )  # fmt: skip
        if drawn:
            ax.legend(loc="upper right")
            if all(float(x).is_integer() for points in drawn.values() for x, _ in points):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(Path(path), buf.getvalue())

"""`core.plot`'s loss charts (PNG or SVG of a fixed size, the same bytes for the same points, one colour per
student with train and val told apart by line style, a zoom on the last half of the steps) and the `run`
report that draws its loss curves with them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from pipelines.config.loading import load_config
from pipelines.core.plot import HEIGHT_PX, WIDTH_PX, Curve, draw_loss_chart, write_loss_chart
from pipelines.stages import report

LABELS = {"x_label": "optimizer step", "y_label": "loss (nats/token)", "title": "Next-token loss by step"}
TRAIN = [(float(step), 7.0 - 0.1 * step) for step in range(0, 40, 2)]
VAL = [(0.0, 7.0), (20.0, 5.0), (40.0, 4.5)]
NTP = {"train": Curve(TRAIN), "val": Curve(VAL)}
COCOMIX = {"train": Curve([(x, y - 0.3) for x, y in TRAIN]), "val": Curve([(x, y - 0.2) for x, y in VAL])}
# matplotlib's default colour cycle, C0 and C1 as 0-255 RGB: the first and the second student.
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


def pixels(path: Path) -> np.ndarray:
    return np.round(imread(path)[..., :3] * 255).astype(int)


def has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(image - np.array(rgb)).max(axis=-1) <= 2).any())


def test_a_chart_is_a_png_of_the_fixed_size_with_one_colour_per_student(tmp_path):
    path = tmp_path / "loss.png"
    write_loss_chart(path, {"ntp": NTP, "cocomix": COCOMIX}, **LABELS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = pixels(path)
    assert image.shape == (HEIGHT_PX, WIDTH_PX, 3) == (480, 1000, 3)
    assert has_colour(image, BLUE) and has_colour(image, ORANGE)
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left beside it
    # One student: its train and val curves share its colour (they used to take two).
    write_loss_chart(tmp_path / "one.png", {"ntp": NTP}, **LABELS)
    one = pixels(tmp_path / "one.png")
    assert has_colour(one, BLUE) and not has_colour(one, ORANGE)


def test_val_is_dashed_and_train_solid_in_the_students_colour(tmp_path):
    svg = draw_loss_chart({"ntp": NTP}, **LABELS, image_format="svg").decode()
    paths = re.findall(r"<path [^>]*>", svg)
    # the curves inside the axes (clipped to them), not the legend's sample lines or the markers
    blue = [p for p in paths if "clip-path" in p and "fill: none" in p and "stroke: #1f77b4" in p]
    # train and val, in the full view and the zoom: two solid, two dashed
    assert sorted("stroke-dasharray" in p for p in blue) == [False, False, True, True]


def test_the_same_points_give_the_same_bytes_and_other_points_others(tmp_path):
    for suffix in ("png", "svg"):
        write_loss_chart(tmp_path / f"a.{suffix}", {"ntp": NTP}, **LABELS)
        write_loss_chart(tmp_path / f"b.{suffix}", {"ntp": NTP}, **LABELS)
        fewer = {"ntp": {"train": Curve(TRAIN), "val": Curve(VAL[:2])}}
        write_loss_chart(tmp_path / f"c.{suffix}", fewer, **LABELS)
        write_loss_chart(tmp_path / f"d.{suffix}", {"ntp": NTP}, **{**LABELS, "title": "Other"})
        first = (tmp_path / f"a.{suffix}").read_bytes()
        assert (tmp_path / f"b.{suffix}").read_bytes() == first, suffix
        assert (tmp_path / f"c.{suffix}").read_bytes() != first, suffix
        assert (tmp_path / f"d.{suffix}").read_bytes() != first, suffix
        assert b"Matplotlib v" not in first and b"<dc:date>" not in first  # nor an upgrade, nor the day
    assert (tmp_path / "a.svg").read_bytes().startswith(b"<?xml")


def test_a_student_without_points_is_left_out_of_the_lines_and_the_legend(tmp_path):
    empty = {"train": Curve(), "val": Curve()}
    write_loss_chart(tmp_path / "with.png", {"ntp": NTP, "cocomix": empty}, **LABELS)
    write_loss_chart(tmp_path / "without.png", {"ntp": NTP}, **LABELS)
    assert (tmp_path / "with.png").read_bytes() == (tmp_path / "without.png").read_bytes()


def test_a_chart_without_any_points_is_still_written(tmp_path):
    write_loss_chart(tmp_path / "empty.png", {"ntp": {"train": Curve(), "val": Curve()}}, **LABELS)
    image = pixels(tmp_path / "empty.png")
    assert image.shape == (HEIGHT_PX, WIDTH_PX, 3)
    assert not has_colour(image, BLUE) and not has_colour(image, ORANGE)


def test_the_zoom_panel_shows_the_last_half_of_the_steps_at_their_own_scale(tmp_path):
    def lower_right(path):  # below the legend, right of the middle: the zoom panel when there is one
        return pixels(path)[int(0.5 * HEIGHT_PX) :, int(0.7 * WIDTH_PX) :]

    write_loss_chart(tmp_path / "zoomed.png", {"ntp": NTP}, **LABELS)
    assert has_colour(lower_right(tmp_path / "zoomed.png"), BLUE)  # the curves, drawn again at their scale
    # A single step has nothing to zoom on: one panel, its point in the middle.
    write_loss_chart(tmp_path / "single.png", {"ntp": {"train": Curve([(4.0, 6.0)])}}, **LABELS)
    assert not has_colour(lower_right(tmp_path / "single.png"), BLUE)


def test_the_report_plots_train_and_val_per_student_and_names_no_colours(tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "cocomix.toml"
    config.write_text(f'[run]\ndir = "{run_dir}"\nobjectives = ["ntp", "cocomix"]\n')
    cfg = load_config(config)
    stage = run_dir / "pretrain-ntp"
    stage.mkdir(parents=True)
    rows = [{"kind": "val", "step": 0, "val_loss": 7.0, "val_ppl": 1096.6}]
    rows += [{"kind": "train", "step": s, "loss": 7.0 - s / 10, "ntp_loss": 7.0 - s / 10} for s in (2, 4)]
    rows += [{"kind": "val", "step": 4, "val_loss": 6.5, "val_ppl": 665.1}]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert report.loss_series(run_dir, report.student_folders(cfg)) == {
        "ntp": {
            "train": Curve([(2, 6.8), (4, 6.6)]),
            "val": Curve([(0, 7.0), (4, 6.5)]),
        },  # one seed: no band
        "cocomix": {"train": Curve(), "val": Curve()},  # not trained yet: left out of the chart
    }
    summary = report.write(cfg)
    assert json.loads((run_dir / report.SUMMARY).read_text()) == summary
    assert summary["loss_curves"] == str(run_dir / report.LOSS_CURVES)
    assert not [key for key in summary if "colour" in key or "color" in key]
    text = (run_dir / report.REPORT).read_text()
    assert f"]({report.LOSS_CURVES})" in text
    assert not any(word in text for word in ("colour", "color", "blue", "orange"))
    first = (run_dir / report.LOSS_CURVES).read_bytes()
    assert pixels(run_dir / report.LOSS_CURVES).shape == (HEIGHT_PX, WIDTH_PX, 3)
    report.write(cfg)
    assert (run_dir / report.LOSS_CURVES).read_bytes() == first  # a rerun rewrites the same chart


def test_a_band_is_shaded_in_the_colour_of_its_student_and_changes_the_bytes(tmp_path):
    band = [(x, y - 0.5, y + 0.5) for x, y in TRAIN]
    write_loss_chart(tmp_path / "plain.png", {"ntp": {"train": Curve(TRAIN)}}, **LABELS)
    write_loss_chart(tmp_path / "band.png", {"ntp": {"train": Curve(TRAIN, band)}}, **LABELS)
    assert (tmp_path / "band.png").read_bytes() != (tmp_path / "plain.png").read_bytes()
    # the band is C0 at alpha 0.2 on white: (1 - 0.2) * 255 + 0.2 * C0, pixel by pixel
    light = np.array([round(0.8 * 255 + 0.2 * c) for c in BLUE])

    def shaded(path):  # pixels of the band's colour (a line's anti-aliased edge has a few of them too)
        return int((np.abs(pixels(path) - light).max(axis=-1) <= 2).sum())

    assert shaded(tmp_path / "band.png") > 5000 > 50 * shaded(tmp_path / "plain.png")

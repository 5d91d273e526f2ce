"""`core.plot.line_chart` (a PNG of the expected size, the same bytes for the same points, empty series left
out) and the `run` report that draws its loss curves with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from pipelines.config.loading import load_config
from pipelines.core.plot import HEIGHT_PX, WIDTH_PX, line_chart
from pipelines.stages import report

LABELS = {"x_label": "optimizer step", "y_label": "loss (nats/token)", "title": "Next-token loss by step"}
TRAIN = [(float(step), 7.0 - 0.1 * step) for step in range(0, 40, 2)]
VAL = [(0.0, 7.0), (20.0, 5.0), (40.0, 4.5)]
# matplotlib's default colour cycle, C0 and C1 as 0-255 RGB: the first and the second series.
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


def pixels(path: Path) -> np.ndarray:
    return np.round(imread(path)[..., :3] * 255).astype(int)


def has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(image - np.array(rgb)).max(axis=-1) <= 2).any())


def test_a_chart_is_a_png_of_the_fixed_size_with_one_colour_per_series(tmp_path):
    path = tmp_path / "loss.png"
    line_chart(path, {"ntp train": TRAIN, "ntp val": VAL}, **LABELS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = pixels(path)
    assert image.shape == (HEIGHT_PX, WIDTH_PX, 3) == (480, 800, 3)
    assert has_colour(image, BLUE) and has_colour(image, ORANGE)
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left beside it


def test_the_same_points_give_the_same_bytes_and_other_points_others(tmp_path):
    line_chart(tmp_path / "a.png", {"ntp train": TRAIN, "ntp val": VAL}, **LABELS)
    line_chart(tmp_path / "b.png", {"ntp train": TRAIN, "ntp val": VAL}, **LABELS)
    line_chart(tmp_path / "c.png", {"ntp train": TRAIN, "ntp val": VAL[:2]}, **LABELS)
    line_chart(tmp_path / "d.png", {"ntp train": TRAIN, "ntp val": VAL}, **{**LABELS, "title": "Other"})
    first = (tmp_path / "a.png").read_bytes()
    assert (tmp_path / "b.png").read_bytes() == first
    assert (tmp_path / "c.png").read_bytes() != first
    assert (tmp_path / "d.png").read_bytes() != first
    assert b"Matplotlib" not in first  # no version in the metadata: an upgrade alone changes no file


def test_an_empty_series_is_left_out_of_the_lines_and_the_legend(tmp_path):
    line_chart(tmp_path / "with.png", {"ntp train": TRAIN, "cocomix train": [], "ntp val": VAL}, **LABELS)
    line_chart(tmp_path / "without.png", {"ntp train": TRAIN, "ntp val": VAL}, **LABELS)
    assert (tmp_path / "with.png").read_bytes() == (tmp_path / "without.png").read_bytes()


def test_a_chart_without_any_points_is_still_written(tmp_path):
    line_chart(tmp_path / "empty.png", {"ntp train": [], "ntp val": []}, **LABELS)
    image = pixels(tmp_path / "empty.png")
    assert image.shape == (HEIGHT_PX, WIDTH_PX, 3)
    assert not has_colour(image, BLUE) and not has_colour(image, ORANGE)


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

    assert report.loss_series(run_dir, report.student_folders(cfg)) == (
        {
            "ntp train": [(2, 6.8), (4, 6.6)],
            "ntp val": [(0, 7.0), (4, 6.5)],
            "cocomix train": [],  # not trained yet: left out of the chart
            "cocomix val": [],
        },
        {},
    )  # one seed: no bands
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


def test_a_band_is_shaded_in_the_colour_of_its_series_and_changes_the_bytes(tmp_path):
    band = [(x, y - 0.5, y + 0.5) for x, y in TRAIN]
    line_chart(tmp_path / "plain.png", {"ntp train": TRAIN}, **LABELS)
    line_chart(tmp_path / "band.png", {"ntp train": TRAIN}, bands={"ntp train": band}, **LABELS)
    assert (tmp_path / "band.png").read_bytes() != (tmp_path / "plain.png").read_bytes()
    # the band is C0 at alpha 0.2 on white: (1 - 0.2) * 255 + 0.2 * C0, pixel by pixel
    light = np.array([round(0.8 * 255 + 0.2 * c) for c in BLUE])

    def shaded(path):  # pixels of the band's colour (a line's anti-aliased edge has a few of them too)
        return int((np.abs(pixels(path) - light).max(axis=-1) <= 2).sum())

    assert shaded(tmp_path / "band.png") > 5000 > 50 * shaded(tmp_path / "plain.png")

"""The shared plot pieces: integer layer ticks, score panels scaled to their data, labels placed
beside crowded points without overlap, and the readability checks themselves."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import pytest
from matplotlib.text import Text

from dammerge.plotting import (
    ScoreCell,
    integer_ticks,
    line_grid,
    new_figure,
    place_labels,
    save_png,
    score_panels,
)

from .plot_checks import (
    assert_png_fits,
    assert_readable,
    drawn_tick_labels,
    overlapping_texts,
    png_size,
    texts_outside,
)


def tick_texts(axis) -> list[str]:
    axis.figure.draw_without_rendering()
    return [label.get_text() for label in drawn_tick_labels(axis)]


def test_the_checks_see_overlapping_and_clipped_text() -> None:
    """The readability checks can fail: two texts on one spot, a text past the edge."""
    figure, axes = new_figure(4, 3)
    axes[0][0].text(0.5, 0.5, "first label", transform=axes[0][0].transAxes)
    axes[0][0].text(0.52, 0.5, "second label", transform=axes[0][0].transAxes)
    assert overlapping_texts(figure) == [("first label", "second label")]
    figure.text(0.98, 0.5, "cut off at the right edge")
    assert texts_outside(figure) == ["cut off at the right edge"]


@pytest.mark.parametrize(("layers", "expected"), [([0, 1], ["0", "1"]), ([0, 1, 2, 3], None)])
def test_layer_ticks_are_whole_numbers(layers: list[int], expected: list[str] | None) -> None:
    _, axes = new_figure(4, 3)
    ax = axes[0][0]
    ax.plot(layers, [0.3] * len(layers))
    integer_ticks(ax.xaxis, layers)
    texts = tick_texts(ax.xaxis)
    assert texts == (expected or [str(k) for k in layers])
    many = list(range(40))
    ax.plot(many, [0.3] * len(many))
    integer_ticks(ax.xaxis, many)
    values = [float(t.replace("−", "-")) for t in tick_texts(ax.xaxis)]
    assert 2 <= len(values) <= 8 and all(v == int(v) for v in values)


def test_score_panels_scale_each_column_to_its_data_from_zero(tmp_path: Path) -> None:
    names = ["base", "a very long method name that needs wrapping", "DAM"]
    columns = {
        "lang": [ScoreCell(0.02, 0.005), ScoreCell(0.01), ScoreCell(0.04)],
        "sql": [ScoreCell(0.95), ScoreCell(None), ScoreCell(0.2, 0.05)],
        "math": [ScoreCell(0.0), ScoreCell(0.0), ScoreCell(0.0)],
    }
    figure = score_panels(names, columns, "Scores", separators=[1])
    lang, sql, math_ = figure.axes
    low, high = lang.get_xlim()
    assert low == 0 and 0.04 < high < 0.1  # a fixed 0-1 axis would squash these bars
    assert sql.get_xlim()[0] == 0 and sql.get_xlim()[1] >= 0.95
    assert math_.get_xlim() == (0.0, pytest.approx(0.145))  # all zero: a small axis, not 0-1
    values = [t.get_text().strip() for t in lang.texts]
    assert values == ["0.020", "0.010", "0.040"]
    assert [t.get_text().strip() for t in sql.texts][1] == "–"
    assert_readable(figure)
    assert_png_fits(save_png(figure, tmp_path / "scores.png"))


def test_labels_beside_crowded_points_do_not_overlap() -> None:
    """Six points within a few pixels of each other (a cluster of DAM variants) and two apart:
    every label is placed, none overlaps another label, a marker or the axes' edge, and each
    stays anchored to its own point."""
    figure, axes = new_figure(8, 5)
    ax = axes[0][0]
    xs = [50 + k for k in range(6)] + [0.1, 300]
    ys = [0.13 - 0.001 * k for k in range(6)] + [0.02, 0.018]
    labels = [f"objective number {k}" for k in range(6)] + ["Model Soups", "Evolve (800)"]
    ax.scatter(xs, ys)
    ax.set_xscale("log")
    ax.set_xlim(0.02, 1500)
    ax.set_ylim(0, 0.16)
    place_labels(ax, xs, ys, labels, fontsize="x-small")
    assert [t.get_text() for t in ax.texts] == labels
    assert [t.xy for t in ax.texts] == list(zip(xs, ys, strict=True))
    assert_readable(figure)
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = 4 * figure.dpi / 72
    for text, (x, y) in zip(ax.texts, zip(xs, ys, strict=True), strict=True):
        box = Text.get_window_extent(text, renderer)  # the label, without its leader line
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
        for px, py in (ax.transData.transform(p) for p in zip(xs, ys, strict=True)):
            apart_x = box.x1 <= px - radius + 0.5 or box.x0 >= px + radius - 0.5
            apart_y = box.y1 <= py - radius + 0.5 or box.y0 >= py + radius - 0.5
            assert apart_x or apart_y, (text.get_text(), (x, y))
    # No leader line runs through another label: sample each line from its point to its label.
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    for k, text in enumerate(ax.texts):
        if text.arrow_patch is None:
            continue
        (px, py), (cx, cy) = ax.transData.transform(text.xy), boxes[k].get_points().mean(axis=0)
        for step in range(201):
            sx, sy = px + (cx - px) * step / 200, py + (cy - py) * step / 200
            for other, box in enumerate(boxes):
                inside = box.x0 + 1 < sx < box.x1 - 1 and box.y0 + 1 < sy < box.y1 - 1
                assert other == k or not inside, (text.get_text(), ax.texts[other].get_text())


def test_labels_are_placed_nearest_first() -> None:
    """A lone point's label sits right beside it (the first candidate), with no leader line."""
    _, axes = new_figure(5, 4)
    ax = axes[0][0]
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    place_labels(ax, [5], [5], ["alone"], fontsize="small")
    (text,) = ax.texts
    assert math.hypot(*text.xyann) == pytest.approx(4) and text.get_ha() == "left"
    assert text.arrow_patch is None


def test_line_grid_has_one_legend_integer_ticks_and_a_sensible_aspect(tmp_path: Path) -> None:
    panels = {
        f"method {k} with a rather long name": {
            "lang": [(0, 0.3), (1, 0.35)],
            "math": [(0, 0.31), (1, 0.36)],
            "sql": [(0, 0.4), (1, 0.2)],
        }
        for k in range(13)
    }
    figure = line_grid(panels, "Learned coefficients", "mean coefficient")
    assert len(figure.legends) == 1 and [t.get_text() for t in figure.legends[0].texts] == [
        "lang",
        "math",
        "sql",
    ]
    drawn = [ax for ax in figure.axes if ax.axison]
    assert len(drawn) == 13
    for ax in drawn:
        assert tick_texts(ax.xaxis) == ["0", "1"]
    colours = {tuple(line.get_color() for line in ax.lines) for ax in drawn}
    assert len(colours) == 1  # a series has one colour in every panel
    assert_readable(figure)
    path = save_png(figure, tmp_path / "grid.png")
    assert_png_fits(path)
    width, height = png_size(path)
    assert width / height < 2.5


def test_save_png_leaves_no_temporary_file_and_plain_permissions(tmp_path: Path) -> None:
    figure, _ = new_figure(3, 2)
    save_png(figure, tmp_path / "out" / "plot.png")
    (tmp_path / "out" / "plain.txt").write_text("made by open()")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["plain.txt", "plot.png"]
    mode = (tmp_path / "out" / "plot.png").stat().st_mode & 0o777
    assert mode == (tmp_path / "out" / "plain.txt").stat().st_mode & 0o777


def test_pairwise_overlap_of_boxes_matches_a_brute_force() -> None:
    """``Box.overlap`` against counting the shared unit cells of integer rectangles."""
    from dammerge.plotting import Box

    boxes = [Box(0, 0, 4, 3), Box(2, 1, 6, 5), Box(4, 0, 5, 2), Box(1, 2, 3, 3), Box(7, 7, 8, 9)]
    for a, b in combinations(boxes, 2):
        cells_a = {(x, y) for x in range(int(a.x0), int(a.x1)) for y in range(int(a.y0), int(a.y1))}
        cells_b = {(x, y) for x in range(int(b.x0), int(b.x1)) for y in range(int(b.y0), int(b.y1))}
        assert a.overlap(b) == len(cells_a & cells_b) == b.overlap(a)


def test_a_single_panel_grid_is_wide_enough_for_its_title() -> None:
    panels = {"DAM": {"lang": [(0, 0.36), (1, 0.34)], "math": [(0, 0.37), (1, 0.34)]}}
    figure = line_grid(panels, "Learned coefficients over depth (first seed)", "mean coefficient")
    assert_readable(figure)

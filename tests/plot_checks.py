"""What a readable figure means, measured: every text inside the canvas and apart from every
other text, and the saved PNG within a size a screen shows whole. Used by the plot tests."""

from __future__ import annotations

import struct
from itertools import combinations
from pathlib import Path

from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

MAX_PIXELS = (2400, 1800)


def visible_texts(figure: Figure) -> list[Text]:
    """Every text ``figure`` draws, non-empty: figure titles and legends, and for each axes (the
    colour bar's included) its titles, axis labels, tick labels in view, texts, annotations and
    legend."""
    texts: list[Text] = [figure._suptitle, figure._supxlabel, figure._supylabel, *figure.texts]
    for legend in figure.legends:
        texts += [legend.get_title(), *legend.get_texts()]
    for ax in figure.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            texts += [axis.label, axis.get_offset_text(), *drawn_tick_labels(axis)]
        legend = ax.get_legend()
        if legend is not None:
            texts += [legend.get_title(), *legend.get_texts()]
    unique = {id(t): t for t in texts if t is not None}  # the figure's titles are in its texts
    return [t for t in unique.values() if t.get_visible() and t.get_text().strip()]


def drawn_tick_labels(axis: Axis) -> list[Text]:
    """The tick labels of ``axis`` inside its view limits (the others are built, not drawn)."""
    low, high = sorted(axis.get_view_interval())
    tolerance = 1e-9 * max(abs(low), abs(high), 1.0)
    labels = []
    for tick in (*axis.get_major_ticks(), *axis.get_minor_ticks()):
        if low - tolerance <= tick.get_loc() <= high + tolerance:
            labels += [label for label in (tick.label1, tick.label2) if label.get_visible()]
    return labels


def text_boxes(figure: Figure) -> list[tuple[str, Bbox]]:
    """(text, window extent in pixels) of every visible text after a full draw."""
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    boxes = []
    for text in visible_texts(figure):
        box = Text.get_window_extent(text, renderer)  # an annotation's text, not its leader line
        if box.width > 0 and box.height > 0:
            boxes.append((text.get_text(), box))
    return boxes


def overlapping_texts(figure: Figure, slack: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of texts whose boxes overlap by more than ``slack`` pixels each way."""
    pairs = []
    for (a, box_a), (b, box_b) in combinations(text_boxes(figure), 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > slack and height > slack:
            pairs.append((a, b))
    return pairs


def texts_outside(figure: Figure, margin: float = 2.0) -> list[str]:
    """Texts closer than ``margin`` pixels to the canvas edge or past it (cut off in the PNG)."""
    width, height = figure.canvas.get_width_height()
    return [
        text
        for text, box in text_boxes(figure)
        if min(box.x0, box.y0) < margin or box.x1 > width - margin or box.y1 > height - margin
    ]


def assert_readable(figure: Figure) -> None:
    assert overlapping_texts(figure) == []
    assert texts_outside(figure) == []


def png_size(path: Path) -> tuple[int, int]:
    """Width and height in pixels, read from the PNG header."""
    header = Path(path).read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", header[16:24])


def assert_png_fits(path: Path, min_side: int = 300) -> None:
    """A saved plot a screen shows whole, and not a thin strip (aspect at most 3.5 : 1)."""
    width, height = png_size(path)
    assert min_side <= width <= MAX_PIXELS[0] and min_side <= height <= MAX_PIXELS[1], (
        width,
        height,
    )
    assert max(width, height) / min(width, height) <= 3.5, (width, height)

"""Figure conventions shared by every PNG dammerge writes (reports, coefficients, searches).

Each plot is drawn on a ``matplotlib.figure.Figure`` (no pyplot state, no display backend) with
constrained layout, at the resolution it is saved at, so text never overlaps and what a test
measures is what a reader sees. The helpers here are the pieces the plots share: integer layer
ticks, wrapped titles, a panel of horizontal score bars per column, a grid of line panels with
one legend, and labels placed beside scatter points without covering each other.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure

DPI = 120
# Width of one character of a figure title at matplotlib's default size, with a margin.
TITLE_INCHES_PER_CHAR = 0.12
# One colour per score column, the same in every score plot.
COLUMN_COLOURS = {
    "lang": "tab:blue",
    "math": "tab:orange",
    "sql": "tab:green",
    "average": "tab:red",
    "compositional": "tab:purple",
}


def new_figure(
    width: float, height: float, nrows: int = 1, ncols: int = 1, **subplots: Any
) -> tuple[Figure, Any]:
    """A constrained-layout figure of ``width`` x ``height`` inches and its axes grid (2-D), on
    an Agg canvas (PNG output, and the renderer that text measurements need)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False, **subplots)
    return figure, axes


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` at :data:`DPI`, atomically (a temporary sibling, a rename;
    a full disk or a refused write is an ``OutputError``), readable as a plain file would be."""
    from dammerge.outputs import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def integer_ticks(axis: Axis, values: Sequence[int] = ()) -> None:
    """Ticks at whole numbers only: at each of ``values`` when there are few, else a sparse set."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if values and len(values) <= 12:
        axis.set_major_locator(FixedLocator(sorted(set(values))))
    else:
        axis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def wrap(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters (at spaces)."""
    return "\n".join(textwrap.wrap(text, width)) or text


# --------------------------------------------------------------------------- score bars


@dataclass(frozen=True)
class ScoreCell:
    """One bar: a mean score and its standard deviation over seeds (None where absent)."""

    mean: float | None
    std: float | None = None


def score_panels(
    names: Sequence[str],
    columns: Mapping[str, Sequence[ScoreCell]],
    title: str,
    separators: Sequence[int] = (),
) -> Figure:
    """One panel of horizontal bars per score column, one bar per name, each panel scaled to its
    own data from 0 and each bar labelled with its value: a 0.02 next to a 0.95 stays readable.
    ``separators``: row indices above which a dashed line marks a new group (references, merges).
    """
    labels = [wrap(name, 22) for name in names]
    lines = sum(label.count("\n") + 1 for label in labels)
    height = max(3.6, 1.3 + 0.24 * lines + 0.06 * len(names))
    figure, axes = new_figure(2.0 + 2.1 * len(columns), height, 1, len(columns), sharey=True)
    positions = list(range(len(names)))
    for ax, (column, cells) in zip(axes[0], columns.items(), strict=True):
        means = [cell.mean or 0.0 for cell in cells]
        errors = [cell.std or 0.0 for cell in cells]
        colour = COLUMN_COLOURS.get(column, "tab:gray")
        ax.barh(positions, means, xerr=errors, color=colour, height=0.7, capsize=2)
        top = max((m + e for m, e in zip(means, errors, strict=True)), default=0.0)
        ax.set_xlim(0, (top or 0.1) * 1.45)
        for y, cell, error in zip(positions, cells, errors, strict=True):
            text = "–" if cell.mean is None else f"{cell.mean:.3f}"
            ax.text((cell.mean or 0.0) + error, y, f" {text}", va="center", fontsize="x-small")
        for row in separators:
            ax.axhline(row - 0.5, color="0.6", linestyle="--", linewidth=0.8)
        ax.set_title(column)
        ax.xaxis.set_major_locator(_sparse_locator())
        ax.tick_params(axis="x", labelsize="small")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions, labels)
    axes[0][0].invert_yaxis()
    figure.supxlabel("score (primary metric; each panel has its own scale)", fontsize="small")
    figure.suptitle(title)
    return figure


def _sparse_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=3, min_n_ticks=2)


# --------------------------------------------------------------------------- line panels


def line_grid(
    panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    title: str,
    ylabel: str,
    columns: int = 4,
) -> Figure:
    """A grid of small line plots, one per panel title, one line per series of (layer, value)
    points; integer layer ticks, each panel scaled to its data, one legend below the grid."""
    count = len(panels)
    cols = min(columns, count)
    rows = -(-count // cols)
    width = max(0.6 + 3.0 * cols, TITLE_INCHES_PER_CHAR * len(title) + 0.6)  # the title fits
    figure, axes = new_figure(width, 1.0 + 2.4 * rows, rows, cols)
    handles: dict[str, Any] = {}  # one line per series name, for the shared legend
    for index, (ax, (panel, series)) in enumerate(zip(axes.flat, panels.items(), strict=False)):
        layers: set[int] = set()
        for name, points in series.items():
            xs = [x for x, _ in points]
            colour = f"C{list(handles).index(name) if name in handles else len(handles)}"
            (line,) = ax.plot(xs, [y for _, y in points], marker="o", markersize=3, color=colour)
            handles.setdefault(name, line)
            layers.update(xs)
        integer_ticks(ax.xaxis, sorted(layers))
        ax.yaxis.set_major_locator(_sparse_locator())
        ax.tick_params(labelsize="small")
        ax.set_title(wrap(panel, 30), fontsize="medium")
        ax.grid(alpha=0.3)
        if index % cols == 0:
            ax.set_ylabel(ylabel, fontsize="small")
        if index + cols >= count:  # no panel below this one
            ax.set_xlabel("layer", fontsize="small")
    for ax in list(axes.flat)[count:]:
        ax.set_axis_off()
    figure.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncols=min(len(handles), 6),
        fontsize="small",
    )
    figure.suptitle(title)
    return figure


# --------------------------------------------------------------------------- point labels


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in display pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlap(self, other: Box) -> float:
        """Area shared with ``other`` (0 when apart or only touching)."""
        width = min(self.x1, other.x1) - max(self.x0, other.x0)
        height = min(self.y1, other.y1) - max(self.y0, other.y0)
        return width * height if width > 0 and height > 0 else 0.0

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def crosses(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Whether the segment from ``a`` to ``b`` passes through this box (Liang-Barsky)."""
        (ax, ay), (dx, dy) = a, (b[0] - a[0], b[1] - a[1])
        low, high = 0.0, 1.0
        for step, room in (
            (-dx, ax - self.x0),
            (dx, self.x1 - ax),
            (-dy, ay - self.y0),
            (dy, self.y1 - ay),
        ):
            if step == 0:
                if room < 0:
                    return False
                continue
            t = room / step
            if step < 0:
                low = max(low, t)
            else:
                high = min(high, t)
            if low > high:
                return False
        return True

    def inside(self, other: Box) -> bool:
        return (
            self.x0 >= other.x0
            and self.y0 >= other.y0
            and self.x1 <= other.x1
            and self.y1 <= other.y1
        )


# Distances (points) from a marker to its label, tried nearest first; each in 16 directions.
LABEL_RADII = (4, 10, 18, 28, 40, 54, 70, 88, 108, 130)
DIRECTIONS = 16
# Beside the marker reads best, then diagonally, then above or below; right before left.
ANGLES = sorted(
    (2 * math.pi * step / DIRECTIONS for step in range(DIRECTIONS)),
    key=lambda a: (round(abs(math.sin(a)), 6), -math.cos(a)),
)
MARKER_RADIUS_PT = 4.0
LEADER_FROM_PT = 12


def place_labels(
    ax: Axes, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], fontsize: str
) -> None:
    """Annotate each point (data coordinates) with its label where the label covers no other
    label and no marker, nearest spot first; a label set off from its point gets a thin leader
    line that crosses no other label. Axis limits must be final: the search runs in pixels."""
    figure = ax.figure
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    area = ax.get_window_extent(renderer)
    scale = figure.dpi / 72
    pixels = [tuple(ax.transData.transform((x, y))) for x, y in zip(xs, ys, strict=True)]
    radius = MARKER_RADIUS_PT * scale
    layout = _Layout(
        frame=Box(area.x0 + 1, area.y0 + 1, area.x1 - 1, area.y1 - 1),
        markers=[Box(px - radius, py - radius, px + radius, py + radius) for px, py in pixels],
    )
    for (px, py), label, x, y in zip(pixels, labels, xs, ys, strict=True):
        width, height = _text_size(figure, renderer, label, fontsize)
        spot = layout.place(px, py, width, height, scale)
        annotation = ax.annotate(
            label,
            (x, y),
            xytext=spot.offset,
            textcoords="offset points",
            ha=spot.ha,
            va=spot.va,
            fontsize=fontsize,
            arrowprops={"arrowstyle": "-", "color": "0.45", "lw": 0.6, "shrinkA": 1, "shrinkB": 4}
            if _has_leader(spot)
            else None,
        )
        annotation.set_in_layout(False)


@dataclass(frozen=True)
class _Spot:
    box: Box
    offset: tuple[float, float]
    ha: str
    va: str


def _has_leader(spot: _Spot) -> bool:
    return math.hypot(*spot.offset) >= LEADER_FROM_PT


@dataclass
class _Layout:
    """What placed labels occupy so far: the markers, the label boxes and their leader lines."""

    frame: Box
    markers: list[Box]
    labels: list[Box] = field(default_factory=list)
    leaders: list[tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=list)

    def place(self, px: float, py: float, width: float, height: float, scale: float) -> _Spot:
        """The nearest free candidate; failing that, the one inside the frame with the least
        overlap (or the first one tried). The chosen spot is then taken."""
        best: tuple[tuple[float, int], _Spot] | None = None
        spot = _candidate(px, py, width, height, LABEL_RADII[0], ANGLES[0], scale)
        for radius in LABEL_RADII:
            for angle in ANGLES:
                candidate = _candidate(px, py, width, height, radius, angle, scale)
                cost = self.cost(candidate, (px, py))
                if cost is not None and (best is None or cost < best[0]):
                    best = (cost, candidate)
                if cost == (0, 0):
                    break
            if best is not None and best[0] == (0, 0):
                break
        if best is not None:
            spot = best[1]
        self.labels.append(spot.box)
        if _has_leader(spot):
            self.leaders.append(((px, py), spot.box.centre))
        return spot

    def cost(self, spot: _Spot, point: tuple[float, float]) -> tuple[float, int] | None:
        """Pixels of overlap with what is taken, then leader lines crossed (a crossing line is
        easier to read past than covered text); None outside the frame."""
        if not spot.box.inside(self.frame):
            return None
        covered = sum(spot.box.overlap(box) for box in (*self.markers, *self.labels))
        crossings = sum(spot.box.crosses(a, b) for a, b in self.leaders)
        if _has_leader(spot):
            crossings += sum(box.crosses(point, spot.box.centre) for box in self.labels)
        return covered, crossings


def _text_size(
    figure: Figure, renderer: RendererBase, label: str, fontsize: str
) -> tuple[float, float]:
    probe = figure.text(0, 0, label, fontsize=fontsize)
    extent = probe.get_window_extent(renderer)
    probe.remove()
    return extent.width + 2, extent.height + 2


def _candidate(
    px: float, py: float, width: float, height: float, radius: float, angle: float, scale: float
) -> _Spot:
    """The label box ``radius`` points from the marker at ``angle``, on the far side of it."""
    dx, dy = radius * math.cos(angle), radius * math.sin(angle)
    x, y = px + dx * scale, py + dy * scale
    ha, x0 = _aligned(math.cos(angle), x, width, ("left", "right"))
    va, y0 = _aligned(math.sin(angle), y, height, ("bottom", "top"))
    return _Spot(Box(x0, y0, x0 + width, y0 + height), (dx, dy), ha, va)


def _aligned(direction: float, at: float, size: float, sides: tuple[str, str]) -> tuple[str, float]:
    """Along one axis: the label's alignment and its box's start, so that it extends away from
    the marker (``sides``: the alignment names for a positive and a negative ``direction``)."""
    if direction > 0.38:
        return sides[0], at
    if direction < -0.38:
        return sides[1], at - size
    return "center", at - size / 2

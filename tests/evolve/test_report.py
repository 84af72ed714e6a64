"""The search's fitness plot: whole-number evaluation ticks, the best so far as steps."""

from __future__ import annotations

from pathlib import Path

from dammerge.evolve.log import EvalRecord
from dammerge.evolve.report import fitness_figure, plot_fitness

from ..plot_checks import assert_png_fits, assert_readable, drawn_tick_labels


def record(evaluation: int, fitness: float | None) -> EvalRecord:
    return EvalRecord(evaluation // 2, evaluation % 2, evaluation, [0.0], {}, fitness, 0.1)


def test_fitness_plot_of_a_short_search(tmp_path: Path) -> None:
    fitness = [-1.5, -1.7, None, -1.2]  # one failed evaluation
    records = [record(k, f) for k, f in enumerate(fitness)]
    figure = fitness_figure(records, "evolve (ties, fitness kl)")
    ax = figure.axes[0]
    figure.draw_without_rendering()
    ticks = [t.get_text() for t in drawn_tick_labels(ax.xaxis)]
    assert ticks and all(t.isdigit() for t in ticks), ticks
    (best,) = ax.lines
    assert best.get_drawstyle() == "steps-post"
    assert list(best.get_xdata()) == [1, 2, 4] and list(best.get_ydata()) == [-1.5, -1.5, -1.2]
    assert_readable(figure)
    plot_fitness(records, tmp_path / "fitness.png", "evolve (ties, fitness kl)")
    assert_png_fits(tmp_path / "fitness.png")

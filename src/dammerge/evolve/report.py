"""What a finished search leaves for people and for the experiment runner: a plot and numbers."""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dammerge.evolve.log import EvalRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory of this process (or of its largest child) in MiB."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def plot_fitness(records: Sequence[EvalRecord], path: Path, title: str) -> None:
    """Write :func:`fitness_figure` to ``path`` (PNG)."""
    from dammerge.plotting import save_png

    save_png(fitness_figure(records, title), path)


def fitness_figure(records: Sequence[EvalRecord], title: str) -> Figure:
    """Fitness of every evaluation and the best so far, over the evaluation count."""
    from dammerge.plotting import integer_ticks, new_figure, wrap

    ordered = sorted(records, key=lambda r: r.evaluation)
    xs = [r.evaluation + 1 for r in ordered if r.fitness is not None]
    ys = [r.fitness for r in ordered if r.fitness is not None]
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y)
        best.append(running)
    figure, axes = new_figure(7, 4)
    ax = axes[0][0]
    ax.scatter(xs, ys, s=10, alpha=0.5, label="candidate")
    ax.step(xs, best, where="post", color="tab:red", linewidth=2, label="best so far")
    integer_ticks(ax.xaxis)
    ax.set_xlabel("fitness evaluation")
    ax.set_ylabel("fitness (higher is better)")
    ax.set_title(wrap(title, 70))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return figure

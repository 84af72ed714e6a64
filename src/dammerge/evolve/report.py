"""What a finished search leaves for people and for the experiment runner: a plot and numbers."""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from pathlib import Path

from dammerge.evolve.log import EvalRecord


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory of this process (or of its largest child) in MiB."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def plot_fitness(records: Sequence[EvalRecord], path: Path, title: str) -> None:
    """Fitness of every evaluation and the best so far, over the evaluation count (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(records, key=lambda r: r.evaluation)
    xs = [r.evaluation + 1 for r in ordered if r.fitness is not None]
    ys = [r.fitness for r in ordered if r.fitness is not None]
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y)
        best.append(running)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.scatter(xs, ys, s=10, alpha=0.5, label="candidate")
    axes.plot(xs, best, color="tab:red", linewidth=2, label="best so far")
    axes.set_xlabel("fitness evaluation")
    axes.set_ylabel("fitness (higher is better)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

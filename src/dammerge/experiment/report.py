"""The experiment report: paper-style tables, a compute table and plots, from the cell records.

Everything here reads what the runner wrote (``merge.json``, ``scores.json``, the merged
checkpoints) and nothing else, so a report can be re-drawn at any time without recomputing.
Outputs: ``report.md``, ``report.json``, ``report.html`` and PNG plots in the report folder.
"""

from __future__ import annotations

import html
import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dammerge.outputs import StagedFolder

if TYPE_CHECKING:
    from dammerge.experiment.config import ExperimentConfig
    from dammerge.experiment.runner import Cell

DOMAINS = ("lang", "math", "sql")
EXTRA_COLUMNS = ("average", "compositional")
COMPUTE_KEYS = ("forward_passes", "backward_passes", "fitness_evaluations")


@dataclass
class Row:
    """One method (or reference model) with the results of each of its seeds."""

    name: str
    group: str
    scores: list[dict[str, Any]] = field(default_factory=list)
    compute: list[dict[str, Any]] = field(default_factory=list)
    models: list[Path] = field(default_factory=list)

    def values(self, column: str) -> list[float]:
        """The primary score of ``column`` over seeds (``average`` is a plain number)."""
        found = []
        for scores in self.scores:
            value = scores.get(column)
            if isinstance(value, dict):
                value = value.get("score")
            if value is not None:
                found.append(float(value))
        return found

    def compute_values(self, key: str) -> list[float]:
        return [float(c[key]) for c in self.compute if c.get(key) is not None]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def fmt(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def collect_rows(cells: list[Cell]) -> list[Row]:
    """Group cells into rows (one per method), keeping the experiment's order."""
    rows: dict[str, Row] = {}
    for cell in cells:
        row = rows.setdefault(cell.name, Row(cell.name, cell.group))
        row.scores.append(json.loads(cell.scores_record.read_text()))
        row.models.append(cell.model)
        if cell.merge_record.exists():
            row.compute.append(json.loads(cell.merge_record.read_text()))
    return list(rows.values())


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def scores_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["model / method", *DOMAINS, *EXTRA_COLUMNS, "runs"]
    body = [
        [row.name, *(fmt(row.values(c)) for c in (*DOMAINS, *EXTRA_COLUMNS)), str(len(row.scores))]
        for row in rows
    ]
    return header, body


def ablation_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["objective", "average (mean)", "std", *DOMAINS, "runs"]
    body = []
    for row in rows:
        mean, std = mean_std(row.values("average"))
        body.append(
            [
                row.name,
                "–" if mean is None else f"{mean:.3f}",
                "–" if std is None else f"{std:.3f}",
                *(fmt(row.values(d)) for d in DOMAINS),
                str(len(row.scores)),
            ]
        )
    return header, body


def compute_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "wall s (mean)", "peak RSS MiB (max)", *COMPUTE_KEYS]
    body = []
    for row in rows:
        if not row.compute:
            continue
        wall = row.compute_values("wall_seconds")
        rss = row.compute_values("peak_rss_bytes")
        extra = []
        for key in COMPUTE_KEYS:
            values = row.compute_values(key)
            extra.append(f"{statistics.fmean(values):,.0f}" if values else "0")
        body.append([row.name, fmt(wall, 1), f"{max(rss) / 2**20:,.0f}" if rss else "–", *extra])
    return header, body


def plot_scores(rows: list[Row], path: Path) -> None:
    """Grouped bars: each row's per-domain scores and average, with std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*DOMAINS, "average"]
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4))
    for k, column in enumerate(columns):
        stats = [mean_std(row.values(column)) for row in rows]
        means = [m or 0.0 for m, _ in stats]
        errors = [s or 0.0 for _, s in stats]
        xs = [i + (k - len(columns) / 2 + 0.5) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=errors, label=column, capsize=2)
    ax.set_xticks(range(len(rows)), [row.name for row in rows], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.legend(ncols=len(columns), fontsize="small")
    ax.set_title("Held-out score by method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_score_vs_compute(rows: list[Row], path: Path) -> None:
    """Average score against merge wall time: what each method buys with its compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        wall, score = (
            mean_std(row.compute_values("wall_seconds"))[0],
            mean_std(row.values("average"))[0],
        )
        if wall is None or score is None:
            continue
        ax.scatter([wall], [score])
        ax.annotate(
            row.name, (wall, score), fontsize="small", xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("merge wall time (s, log scale)")
    ax.set_ylabel("average score")
    ax.set_title("Score against compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def coefficient_profiles(model: Path) -> dict[str, list[float]]:
    """Mean learned coefficient per block layer, per participant, of a learned merge's output."""
    from dammerge.learned.inspect import coefficient_rows

    rows, _ = coefficient_rows(model)
    sums: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if row.layer is None or row.module.endswith(".bias"):
            continue
        sums.setdefault(row.participant, {}).setdefault(row.layer, []).append(row.mean)
    return {
        who: [statistics.fmean(by_layer[k]) for k in sorted(by_layer)]
        for who, by_layer in sums.items()
    }


def plot_coefficient_profiles(rows: list[Row], path: Path) -> bool:
    """Mean learned coefficient over depth per source model, for each learned row (first seed)."""
    from dammerge.learned.export import COEFFICIENTS_FILE

    profiles = {
        row.name: coefficient_profiles(row.models[0])
        for row in rows
        if (row.models[0] / COEFFICIENTS_FILE).exists()
    }
    if not profiles:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(profiles), figsize=(4.5 * len(profiles), 3.5), squeeze=False)
    for ax, (name, by_model) in zip(axes[0], profiles.items(), strict=True):
        for model, values in by_model.items():
            ax.plot(range(len(values)), values, marker="o", label=model)
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean coefficient")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(config: ExperimentConfig, cells: list[Cell], out: Path) -> Path:
    """Write ``out/report/``: report.md / report.json / report.html and the plots, built in a
    temporary folder and renamed into place whole; return the report folder."""
    with StagedFolder(out / "report", replace=True) as staged:
        _write_report_files(config, cells, staged.tmp)
        return staged.commit()


def _write_report_files(config: ExperimentConfig, cells: list[Cell], report: Path) -> None:
    import platform

    rows = collect_rows(cells)
    main = [r for r in rows if r.group != "ablation"]
    ablation = [r for r in rows if r.group == "ablation"]
    merged = [r for r in rows if r.compute]

    tables = {"scores": scores_table(main), "compute": compute_table(merged)}
    if ablation:
        tables["ablation"] = ablation_table(ablation)
    plot_scores(main, report / "scores.png")
    plot_score_vs_compute(merged, report / "score_vs_compute.png")
    plots = ["scores.png", "score_vs_compute.png"]
    if plot_coefficient_profiles(rows, report / "coefficients.png"):
        plots.append("coefficients.png")

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {_cpu_count()} cores, device {config.device}"
    titles = {
        "scores": "Held-out scores (mean ± std over seeds)",
        "ablation": "DAM objective ablation (mean ± std over seeds)",
        "compute": "Compute per merge",
    }
    sections = [f"# Experiment: {config.name}\n\n{when}; {machine}; family `{config.family}`"]
    for key, (header, body) in tables.items():
        sections.append(f"## {titles[key]}\n\n{markdown_table(header, body)}")
    sections.append("\n".join(f"![{p}]({p})" for p in plots))
    (report / "report.md").write_text("\n\n".join(sections) + "\n")
    data = {
        "name": config.name,
        "date": when,
        "machine": machine,
        "rows": [
            {"name": r.name, "group": r.group, "scores": r.scores, "compute": r.compute}
            for r in rows
        ],
        "tables": {k: {"header": h, "rows": b} for k, (h, b) in tables.items()},
    }
    (report / "report.json").write_text(json.dumps(data, indent=2))
    (report / "report.html").write_text(_html(config.name, when, machine, tables, titles, plots))


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def _html(
    name: str,
    when: str,
    machine: str,
    tables: dict[str, tuple[list[str], list[list[str]]]],
    titles: dict[str, str],
    plots: list[str],
) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}</style>",
        f"<h1>Experiment: {html.escape(name)}</h1>",
        f"<p>{html.escape(when)}; {html.escape(machine)}</p>",
    ]
    for key, (header, body) in tables.items():
        parts.append(f"<h2>{html.escape(titles[key])}</h2><table><tr>")
        parts.extend(f"<th>{html.escape(h)}</th>" for h in header)
        parts.append("</tr>")
        for cells in body:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.extend(f"<p><img src='{p}' alt='{p}'></p>" for p in plots)
    return "\n".join(parts)

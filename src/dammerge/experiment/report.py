"""The experiment report: paper-style tables, a compute table and plots, from the cell records.

Everything here reads what the runner wrote (``merge.json``, ``scores.json``, the merged
checkpoints) and nothing else, so a report can be re-drawn at any time without recomputing.
Outputs: ``report.md``, ``report.json``, ``report.html`` and PNG plots in the report folder.

Every merge row is set against the best single model (the reference row, base or specialist,
with the highest average): a merge is worth running only if it beats picking that model.
"""

from __future__ import annotations

import html
import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dammerge.experiment.runner import REFERENCE_GROUP
from dammerge.outputs import StagedFolder

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console

    from dammerge.experiment.config import ExperimentConfig
    from dammerge.experiment.runner import Cell

DOMAINS = ("lang", "math", "sql")
COMPUTE_KEYS = ("forward_passes", "backward_passes", "fitness_evaluations")
UNBOUNDED_WIDTH = 10_000  # characters: a table printed into a file is never folded
TITLES = {
    "scores": "Held-out scores (mean ± std over seeds)",
    "ablation": "DAM objective ablation (mean ± std over seeds)",
    "compute": "Compute per merge",
}
VERSUS_BEST = "vs best single"  # the column: a merge's average minus the best single model's


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


def average(row: Row) -> float | None:
    """A row's average over the domains, as a mean over its seeds (None if never scored)."""
    return mean_std(row.values("average"))[0]


def best_single(rows: list[Row]) -> Row | None:
    """The reference row (base or a specialist) with the highest average: the model a user
    would pick instead of merging. The first such row wins a tie; None without references."""
    scored = [r for r in rows if r.group == REFERENCE_GROUP and average(r) is not None]
    return max(scored, key=lambda r: average(r) or 0.0, default=None)


def versus_best(row: Row, best: Row | None) -> float | None:
    """A merge row's average minus the best single model's (None for a reference row)."""
    if best is None or row.group == REFERENCE_GROUP:
        return None
    mine, theirs = average(row), average(best)
    return None if mine is None or theirs is None else mine - theirs


def versus_best_cell(row: Row, best: Row | None) -> str:
    """The ``vs best single`` cell: a signed difference, ``best`` on the best row itself."""
    if row is best:
        return "best"
    difference = versus_best(row, best)
    return "" if difference is None else f"{difference:+.3f}"


def best_single_line(best: dict[str, Any] | None) -> str:
    """One sentence naming the best single model (as ``report.json`` records it)."""
    if best is None:
        return "No reference row was scored: no best single model to compare merges with."
    return (
        f"Best single model: {best['name']}, average {best['average']:.3f}; "
        f"`{VERSUS_BEST}` is each merge's average minus that."
    )


def scores_table(rows: list[Row], best: Row | None = None) -> tuple[list[str], list[list[str]]]:
    header = ["model / method", *DOMAINS, "average", VERSUS_BEST, "compositional", "runs"]
    body = [
        [
            row.name,
            *(fmt(row.values(c)) for c in (*DOMAINS, "average")),
            versus_best_cell(row, best),
            fmt(row.values("compositional")),
            str(len(row.scores)),
        ]
        for row in rows
    ]
    return header, body


def ablation_table(rows: list[Row], best: Row | None = None) -> tuple[list[str], list[list[str]]]:
    header = ["objective", "average (mean)", "std", VERSUS_BEST, *DOMAINS, "runs"]
    body = []
    for row in rows:
        mean, std = mean_std(row.values("average"))
        body.append(
            [
                row.name,
                "–" if mean is None else f"{mean:.3f}",
                "–" if std is None else f"{std:.3f}",
                versus_best_cell(row, best),
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


def scores_figure(rows: list[Row]) -> Figure:
    """Each row's per-domain scores and average (mean ± std over seeds), one panel per column."""
    from dammerge.plotting import ScoreCell, score_panels

    columns = {
        column: [ScoreCell(*mean_std(row.values(column))) for row in rows]
        for column in (*DOMAINS, "average")
    }
    groups = [row.group for row in rows]
    separators = [i for i in range(1, len(rows)) if groups[i] != groups[i - 1]]
    return score_panels([row.name for row in rows], columns, "Held-out score by method", separators)


# How each kind of merge is drawn in the score-against-compute plot: (kind, colour, marker).
LEARNED_KIND = ("learned (DAM, AdaMerging)", "tab:red", "o")
SEARCH_KIND = ("evolutionary search", "tab:purple", "D")
DATA_FREE_KIND = ("data-free", "tab:blue", "s")


def merge_kind(compute: dict[str, Any]) -> tuple[str, str, str]:
    """A merge's kind from its compute record: a search counts fitness evaluations, a learned
    merge backward passes (an evolve record names the method it searched over, e.g. ties)."""
    if compute.get("fitness_evaluations"):
        return SEARCH_KIND
    if compute.get("backward_passes") or compute.get("method") in ("dam", "adamerging"):
        return LEARNED_KIND
    return DATA_FREE_KIND


def score_vs_compute_figure(rows: list[Row]) -> Figure:
    """Average score against merge wall time (log scale): what each method buys with its
    compute. Each point is labelled beside it; the score axis starts at 0."""
    from dammerge.plotting import new_figure, place_labels

    points = []
    for row in rows:
        wall = mean_std(row.compute_values("wall_seconds"))[0]
        score = mean_std(row.values("average"))[0]
        if wall is not None and score is not None:
            points.append((max(wall, 1e-3), score, row.name, merge_kind(row.compute[0])))
    figure, axes = new_figure(8.5, 5.5)
    ax = axes[0][0]
    for kind, colour, marker in dict.fromkeys(p[3] for p in points):
        chosen = [p for p in points if p[3] == (kind, colour, marker)]
        ax.scatter(
            [p[0] for p in chosen],
            [p[1] for p in chosen],
            s=30,
            c=colour,
            marker=marker,
            label=kind,
            zorder=3,
        )
    ax.set_xscale("log")
    top = max((p[1] for p in points), default=0.0)
    top = top or 0.1
    ax.set_ylim(-0.03 * top, top * 1.25)  # 0 in view, a zero score's marker drawn whole
    if points:
        walls = [p[0] for p in points]
        ax.set_xlim(min(walls) / 4, max(walls) * 4)  # room for labels on either side
    ax.set_xlabel("merge wall time (s, log scale)")
    ax.set_ylabel("average score")
    ax.set_title("Score against compute")
    ax.grid(alpha=0.3)
    if points:
        figure.legend(loc="outside lower center", ncols=3, fontsize="small")
        place_labels(
            ax,
            [p[0] for p in points],
            [p[1] for p in points],
            [p[2] for p in points],
            fontsize="x-small",
        )
    return figure


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


def learned_profiles(rows: list[Row]) -> dict[str, dict[str, list[float]]]:
    """The coefficient profile of each learned row's first seed, keyed by row name."""
    from dammerge.learned.export import COEFFICIENTS_FILE

    return {
        row.name: coefficient_profiles(row.models[0])
        for row in rows
        if row.models and (row.models[0] / COEFFICIENTS_FILE).exists()
    }


def coefficients_figure(profiles: dict[str, dict[str, list[float]]]) -> Figure:
    """Mean learned coefficient over depth per source model, one panel per learned method."""
    from dammerge.plotting import line_grid

    panels = {
        name: {model: list(enumerate(values)) for model, values in by_model.items()}
        for name, by_model in profiles.items()
    }
    return line_grid(panels, "Learned coefficients over depth (first seed)", "mean coefficient")


def draw_plots(
    rows: list[Row], profiles: dict[str, dict[str, list[float]]], folder: Path
) -> list[str]:
    """Write the report's PNGs into ``folder`` from rows and coefficient profiles (what
    ``report.json`` holds); return their file names."""
    from dammerge.plotting import save_png

    main = [r for r in rows if r.group != "ablation"]
    merged = [r for r in rows if r.compute]
    figures = {
        "scores.png": scores_figure(main),
        "score_vs_compute.png": score_vs_compute_figure(merged),
    }
    if profiles:
        figures["coefficients.png"] = coefficients_figure(profiles)
    for name, figure in figures.items():
        save_png(figure, folder / name)
    return list(figures)


def redraw_plots(report: Path) -> list[str]:
    """Draw a report folder's PNGs again from its ``report.json`` (no model or cell needed)."""
    data = json.loads((Path(report) / "report.json").read_text())
    rows = [Row(r["name"], r["group"], r["scores"], r["compute"]) for r in data["rows"]]
    return draw_plots(rows, data.get("coefficients", {}), Path(report))


def write_report(
    config: ExperimentConfig, cells: list[Cell], out: Path, regime: str | None = None
) -> Path:
    """Write ``out/report/``: report.md / report.json / report.html and the plots, built in a
    temporary folder and renamed into place whole; return the report folder. ``regime`` is the
    family's (``near``/``far``; None when its manifest records none)."""
    with StagedFolder(out / "report", replace=True) as staged:
        _write_report_files(config, cells, staged.tmp, regime)
        return staged.commit()


def _write_report_files(
    config: ExperimentConfig, cells: list[Cell], report: Path, regime: str | None
) -> None:
    import platform

    rows = collect_rows(cells)
    main = [r for r in rows if r.group != "ablation"]
    ablation = [r for r in rows if r.group == "ablation"]
    merged = [r for r in rows if r.compute]
    best = best_single(rows)

    tables = {"scores": scores_table(main, best), "compute": compute_table(merged)}
    if ablation:
        tables["ablation"] = ablation_table(ablation, best)
    profiles = learned_profiles(rows)
    plots = draw_plots(rows, profiles, report)

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {_cpu_count()} cores, device {config.device}"
    best_record = None if best is None else {"name": best.name, "average": average(best)}
    data = {
        "name": config.name,
        "date": when,
        "machine": machine,
        "family": config.family,
        "regime": regime,
        "best_single": best_record,
        "rows": [
            {
                "name": r.name,
                "group": r.group,
                "scores": r.scores,
                "compute": r.compute,
                "versus_best_single": versus_best(r, best),
            }
            for r in rows
        ],
        "tables": {k: {"title": TITLES[k], "header": h, "rows": b} for k, (h, b) in tables.items()},
        "coefficients": profiles,
    }
    lead = header_lines(data)
    sections = [f"# Experiment: {config.name}", *lead]
    for key, (header, body) in tables.items():
        sections.append(f"## {TITLES[key]}\n\n{markdown_table(header, body)}")
    sections.append("\n".join(f"![{p}]({p})" for p in plots))
    (report / "report.md").write_text("\n\n".join(sections) + "\n")
    (report / "report.json").write_text(json.dumps(data, indent=2))
    (report / "report.html").write_text(_html(config.name, lead, tables, TITLES, plots))


def header_lines(data: dict[str, Any]) -> list[str]:
    """The lines under a report's title, from ``report.json``: when and where it ran, on which
    family and regime, and the best single model (older reports lack the last three)."""
    lines = [f"{data['date']}; {data['machine']}"]
    if "family" in data:
        regime = data.get("regime") or "not recorded"
        lines.append(f"family `{data['family']}`, regime: {regime}")
    if "best_single" in data:
        lines.append(best_single_line(data["best_single"]))
    return lines


def print_report(report: Path) -> None:
    """Print a written report's tables on the terminal (stdout), as tables.

    Read from ``report.json``; in a terminal rich fits them to its width, and into a file or a
    pipe each table is printed at its natural width rather than folded at 80 columns.
    """
    data = json.loads((report / "report.json").read_text())
    console = table_console()
    console.print(f"Experiment {data['name']}", markup=False)
    for line in header_lines(data):
        console.print(line.replace("`", ""), markup=False)
    for key, table_data in data["tables"].items():
        title = table_data.get("title", TITLES.get(key, key))
        print_table(console, title, table_data["header"], table_data["rows"])


def table_console() -> Console:
    """A console for tables on stdout: fitted to a terminal, never folded into a file."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=UNBOUNDED_WIDTH)
    return console


def print_table(console: Console, title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print one table, its first column left-aligned and the others (numbers) right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)


def regimes_summary(reports: dict[str, Path]) -> tuple[list[str], list[list[str]]]:
    """One table over several reports of the same experiment, keyed by regime: per regime the
    best single model's average, then each main merge's average and its difference to it (the
    ablation stays in each report)."""
    header = ["regime", "model / method", "average", VERSUS_BEST]
    body = []
    for regime, report in reports.items():
        data = json.loads((Path(report) / "report.json").read_text())
        rows = [Row(r["name"], r["group"], r["scores"]) for r in data["rows"]]
        best = best_single(rows)
        if best is not None:
            body.append([regime, f"best single: {best.name}", _mean_text(best), ""])
        for row in rows:
            if row.group == "main":
                body.append([regime, row.name, _mean_text(row), versus_best_cell(row, best)])
    return header, body


def _mean_text(row: Row) -> str:
    mean = average(row)
    return "–" if mean is None else f"{mean:.3f}"


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def _html(
    name: str,
    lead: list[str],
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
        *(f"<p>{html.escape(line.replace('`', ''))}</p>" for line in lead),
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

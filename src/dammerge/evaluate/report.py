"""Tables and plots of an :class:`EvaluationResult`: rich (terminal), Markdown, JSON, PNG.

Files are written atomically (a temporary sibling, then a rename) so an interrupted run never
leaves a truncated JSON that a script would then misread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dammerge.errors import DammergeError
from dammerge.evaluate.data import COMPOSITIONAL
from dammerge.evaluate.evaluator import EvaluationResult
from dammerge.outputs import check_output_file, write_json_atomic, write_text_atomic
from dammerge.scoring.metrics import truncate_response

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def score_rows(result: EvaluationResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the score table: one row per model, one column per domain + average."""
    specialist_domains = [d for d in result.domains if d != COMPOSITIONAL]
    header = ["model", *specialist_domains, "average"]
    if COMPOSITIONAL in result.domains:
        header.append(COMPOSITIONAL)
    rows = []
    for key, scores in result.models.items():
        row = [result.labels[key], *(_fmt(scores[d].score) for d in specialist_domains)]
        row.append(_fmt(result.average(key)))
        if COMPOSITIONAL in scores:
            row.append(_fmt(scores[COMPOSITIONAL].score))
        rows.append(row)
    return header, rows


def likelihood_rows(result: EvaluationResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the NLL / KL table (lower is better for both)."""
    header = ["model"]
    for domain in result.domains:
        header += (
            [f"{domain} nll", f"{domain} kl"] if domain != COMPOSITIONAL else [f"{domain} nll"]
        )
    rows = []
    for key, scores in result.models.items():
        row = [result.labels[key]]
        for domain in result.domains:
            row.append(_fmt(scores[domain].nll))
            if domain != COMPOSITIONAL:
                row.append(_fmt(scores[domain].kl, 4))
        rows.append(row)
    return header, rows


def rich_tables(result: EvaluationResult) -> list[Any]:
    """Two rich tables: task scores (higher is better), then NLL and KL (lower is better)."""
    from rich.table import Table

    tables = []
    for title, (header, rows) in (
        ("scores (higher is better)", score_rows(result)),
        ("reference NLL and KL to the specialist (lower is better)", likelihood_rows(result)),
    ):
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(result: EvaluationResult) -> str:
    """The two tables as Markdown, with what the numbers mean."""
    settings = ", ".join(f"{k} {v}" for k, v in result.settings.items() if v is not None)
    parts = [
        "## Scores (higher is better)",
        "",
        _markdown_table(*score_rows(result)),
        "",
        "`average` is the mean over the specialist domains; the compositional set is not in it.",
        "",
        "## Reference NLL and KL(specialist ‖ model) per response token (lower is better)",
        "",
        _markdown_table(*likelihood_rows(result)),
        "",
        f"Settings: {settings}." if settings else "",
    ]
    return "\n".join(parts).rstrip() + "\n"


def write_json(result: EvaluationResult, path: str | Path) -> None:
    """``{"models": {dir: {domain: {"score", "nll", "kl"}, ..., "average": a}}}``."""
    write_json_atomic(path, result.to_json())


def write_markdown(result: EvaluationResult, path: str | Path) -> None:
    write_text_atomic(path, markdown(result))


def write_responses(result: EvaluationResult, path: str | Path) -> None:
    """One JSON line per (model, record): the scored response, its score and the raw generation."""
    lines = []
    for key, scores in result.models.items():
        for domain, score in scores.items():
            ids = result.record_ids.get(domain, [])
            for i, (response, value) in enumerate(
                zip(score.responses, score.record_scores, strict=True)
            ):
                record_id = ids[i] if i < len(ids) else str(i)
                lines.append(
                    json.dumps(
                        {
                            "model": key,
                            "domain": domain,
                            "id": record_id,
                            "response": truncate_response(response),
                            "score": value,
                            "raw": response,
                        }
                    )
                )
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def write_plot(result: EvaluationResult, path: str | Path) -> None:
    """Score bars: one panel per domain (and average, compositional), one bar per model."""
    from dammerge.plotting import save_png

    save_png(scores_figure(result), Path(path))


def scores_figure(result: EvaluationResult) -> Figure:
    """The figure :func:`write_plot` saves: each panel scaled to its own scores from 0."""
    from dammerge.plotting import ScoreCell, score_panels

    header, _ = score_rows(result)
    keys = list(result.models)
    columns = {
        group: [
            ScoreCell(
                result.average(key) if group == "average" else result.models[key][group].score
            )
            for key in keys
        ]
        for group in header[1:]
    }
    return score_panels([result.labels[key] for key in keys], columns, "Per-domain scores")


def check_output_paths(*paths: Path | None, plot_path: Path | None = None) -> None:
    """Reject unusable output paths before any compute: a folder, a place that cannot be
    written, a plot not ending .png."""
    for path in (*paths, plot_path):
        if path is not None:
            check_output_file(path)
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise DammergeError(f"--plot {plot_path} must end in .png", "for example --plot scores.png")

"""The report: mean ± std over seeds, the three tables, and the files written."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from dammerge.experiment.config import ExperimentConfig
from dammerge.experiment.report import (
    Row,
    best_single,
    coefficients_figure,
    collect_rows,
    draw_plots,
    fmt,
    print_report,
    redraw_plots,
    regimes_summary,
    score_vs_compute_figure,
    scores_figure,
    versus_best,
    write_report,
)
from dammerge.experiment.runner import Cell

from ..plot_checks import assert_png_fits, assert_readable, drawn_tick_labels


def scores(lang: float, math: float, sql: float) -> dict:
    domains = {"lang": lang, "math": math, "sql": sql}
    record = {d: {"score": s, "nll": 1.0, "kl": 0.1} for d, s in domains.items()}
    record["compositional"] = {"score": 0.25, "nll": 2.0, "kl": None}
    record["average"] = sum(domains.values()) / 3
    return record


def make_cell(root: Path, name: str, group: str, seed: int | None, values, wall=None) -> Cell:
    cell = Cell(name, group, root / name / str(seed), seed, {"merge_method": "linear"})
    cell.folder.mkdir(parents=True)
    cell.scores_record.write_text(json.dumps(scores(*values)))
    if wall is not None:
        cell.merge_record.write_text(json.dumps({"wall_seconds": wall, "peak_rss_bytes": 2**30}))
    return cell


def test_rows_aggregate_seeds_with_sample_std(tmp_path: Path) -> None:
    cells = [
        make_cell(tmp_path, "DAM", "main", 0, (0.5, 0.4, 0.3), wall=10),
        make_cell(tmp_path, "DAM", "main", 1, (0.7, 0.4, 0.3), wall=12),
    ]
    (row,) = collect_rows(cells)
    assert row.values("lang") == [0.5, 0.7]
    assert fmt(row.values("lang")) == f"0.600 ± {statistics.stdev([0.5, 0.7]):.3f}"
    assert fmt(row.values("math")) == "0.400 ± 0.000"
    assert fmt([]) == "–"


def test_report_writes_tables_and_plots(tmp_path: Path) -> None:
    cells = [
        make_cell(tmp_path, "base", "reference", None, (0.1, 0.1, 0.1)),
        make_cell(tmp_path, "Soups", "main", None, (0.4, 0.3, 0.2), wall=1.5),
        make_cell(tmp_path, "KL", "ablation", 0, (0.5, 0.5, 0.5), wall=30),
        make_cell(tmp_path, "KL", "ablation", 1, (0.6, 0.4, 0.5), wall=31),
    ]
    config = ExperimentConfig.model_validate(
        {"family": "f", "methods": [{"name": "Soups", "recipe": {"merge_method": "linear"}}]}
    )
    report = write_report(config, cells, tmp_path / "out")
    text = (report / "report.md").read_text()
    assert "| Soups | 0.400 | 0.300 | 0.200 | 0.300 | +0.200 | 0.250 | 1 |" in text
    assert "| KL | 0.500 | 0.000 |" in text  # ablation: averages 0.5 and 0.5
    assert "| Soups | 1.5 | 1,024 |" in text
    data = json.loads((report / "report.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["base", "Soups", "KL"]
    for plot in ("scores.png", "score_vs_compute.png"):
        assert (report / plot).stat().st_size > 1000
    assert data["coefficients"] == {}  # no learned cell here
    assert "<table>" in (report / "report.html").read_text()


def best_single_cells(root: Path) -> list[Cell]:
    """References whose averages are 0.1 (base), 0.2 (lang, math) and 0.3 (sql); a merge run
    once, a merge over two seeds, and an ablation row over two seeds."""
    return [
        make_cell(root, "base", "reference", None, (0.1, 0.1, 0.1)),
        make_cell(root, "lang", "reference", None, (0.5, 0.0, 0.1)),
        make_cell(root, "math", "reference", None, (0.0, 0.6, 0.0)),
        make_cell(root, "sql", "reference", None, (0.0, 0.0, 0.9)),
        make_cell(root, "Soups", "main", None, (0.2, 0.2, 0.2), wall=1),
        make_cell(root, "DAM", "main", 0, (0.3, 0.3, 0.3), wall=9),
        make_cell(root, "DAM", "main", 1, (0.5, 0.4, 0.3), wall=9),
        make_cell(root, "KL", "ablation", 0, (0.1, 0.1, 0.1), wall=9),
        make_cell(root, "KL", "ablation", 1, (0.2, 0.2, 0.2), wall=9),
    ]


def test_every_merge_row_is_set_against_the_best_single_model(tmp_path: Path, capsys) -> None:
    """By hand: the best single model is sql (average 0.9 / 3 = 0.3). Soups: 0.2 - 0.3;
    DAM: the mean of its seeds' averages, (0.3 + 0.4) / 2 = 0.35, so +0.05; KL (ablation):
    (0.1 + 0.2) / 2 - 0.3 = -0.15. The regime comes from the family, shown in every format."""
    config = ExperimentConfig.model_validate(
        {"family": "fam", "methods": [{"name": "Soups", "recipe": {"merge_method": "linear"}}]}
    )
    report = write_report(config, best_single_cells(tmp_path / "cells"), tmp_path, regime="near")
    data = json.loads((report / "report.json").read_text())
    assert data["regime"] == "near"
    assert data["best_single"]["name"] == "sql"
    assert data["best_single"]["average"] == pytest.approx(0.3)
    versus = {r["name"]: r["versus_best_single"] for r in data["rows"]}
    assert versus == {
        "base": None,
        "lang": None,
        "math": None,
        "sql": None,
        "Soups": pytest.approx(-0.1),
        "DAM": pytest.approx(0.05),
        "KL": pytest.approx(-0.15),
    }
    text = (report / "report.md").read_text()
    assert "family `fam`, regime: near" in text
    assert "Best single model: sql, average 0.300" in text
    assert "| average | vs best single | compositional |" in text
    assert "| sql | 0.000 | 0.000 | 0.900 | 0.300 | best | 0.250 | 1 |" in text
    assert "| base | 0.100 | 0.100 | 0.100 | 0.100 |  | 0.250 | 1 |" in text
    assert "| Soups | 0.200 | 0.200 | 0.200 | 0.200 | -0.100 |" in text
    assert "| 0.350 ± 0.071 | +0.050 |" in text  # DAM's average over seeds, then the difference
    assert "| KL | 0.150 | 0.071 | -0.150 |" in text
    page = (report / "report.html").read_text()
    assert "regime: near" in page and "<td>+0.050</td>" in page
    print_report(report)
    printed = capsys.readouterr().out
    assert "regime: near" in printed and "Best single model: sql, average 0.300" in printed
    assert "+0.050" in printed and "vs best single" in printed


def test_the_first_of_equal_references_is_the_best_single_model() -> None:
    rows = [
        Row("base", "reference", [scores(0.0, 0.0, 0.0)]),
        Row("lang", "reference", [scores(0.6, 0.0, 0.0)]),
        Row("math", "reference", [scores(0.0, 0.6, 0.0)]),
        Row("merge", "main", [scores(0.9, 0.9, 0.9)]),  # a merge is never the "single model"
    ]
    assert best_single(rows) is rows[1]
    assert best_single([rows[3]]) is None
    assert versus_best(rows[3], None) is None


def test_the_regimes_summary_lists_each_regime_against_its_best_single_model(
    tmp_path: Path,
) -> None:
    """Two regimes' reports, one table: per regime the best single model, then every main
    merge with its average and difference (by hand: far's best is sql at 0.3, near's is lang
    at (0.9 + 0.3 + 0.3) / 3 = 0.5); ablation rows stay in the reports."""
    far = write_report(
        ExperimentConfig.model_validate(
            {"family": "far", "methods": [{"name": "Soups", "recipe": {"merge_method": "linear"}}]}
        ),
        best_single_cells(tmp_path / "far-cells"),
        tmp_path / "far",
        regime="far",
    )
    near_cells = [
        make_cell(tmp_path / "near-cells", "base", "reference", None, (0.3, 0.3, 0.3)),
        make_cell(tmp_path / "near-cells", "lang", "reference", None, (0.9, 0.3, 0.3)),
        make_cell(tmp_path / "near-cells", "Soups", "main", None, (0.6, 0.6, 0.6), wall=1),
    ]
    near = write_report(
        ExperimentConfig.model_validate(
            {"family": "near", "methods": [{"name": "Soups", "recipe": {"merge_method": "linear"}}]}
        ),
        near_cells,
        tmp_path / "near",
        regime="near",
    )
    header, body = regimes_summary({"near": near, "far": far})
    assert header == ["regime", "model / method", "average", "vs best single"]
    assert body == [
        ["near", "best single: lang", "0.500", ""],
        ["near", "Soups", "0.600", "+0.100"],
        ["far", "best single: sql", "0.300", ""],
        ["far", "Soups", "0.200", "-0.100"],
        ["far", "DAM", "0.350", "+0.050"],
    ]


# The shipped full comparison's rows: long names, a tight cluster of DAM objectives, small scores.
SMALL_FAMILY_ROWS = [
    ("Model Soups", "main", "linear", 0.05, 0.020),
    ("Task arithmetic", "main", "task_arithmetic", 0.09, 0.020),
    ("TIES", "main", "ties", 0.23, 0.028),
    ("DARE-TIES", "main", "dare_ties", 0.25, 0.040),
    ("DAM", "main", "dam", 59.0, 0.132),
    ("DAM (paper defaults)", "main", "dam", 52.2, 0.023),
    ("AdaMerging", "main", "adamerging", 40.2, 0.023),
    ("Evolve (CMA-ES, TIES)", "main", "evolve", 65.7, 0.021),
    ("Evolve (CMA-ES, TIES, 800 evaluations)", "main", "evolve", 315.6, 0.018),
    ("KL", "ablation", "dam", 55.4, 0.126),
    ("KL + Reg", "ablation", "dam", 51.3, 0.129),
    ("KL + Cosine", "ablation", "dam", 47.6, 0.132),
    ("KL + Cosine + Reg", "ablation", "dam", 59.8, 0.129),
    ("MSE + Cosine", "ablation", "dam", 54.1, 0.025),
    ("Entropy", "ablation", "dam", 41.7, 0.005),
    ("Entropy + Cosine", "ablation", "dam", 40.6, 0.006),
]


def small_family_rows() -> list[Row]:
    rows = [Row(name, "reference", [scores(0.09, 0.0, 0.0)]) for name in ("base", "lang", "math")]
    rows.append(Row("sql", "reference", [scores(0.08, 0.0, 0.95)]))
    for name, group, method, wall, average in SMALL_FAMILY_ROWS:
        record = scores(average, average / 2, average * 1.5)
        compute = {"wall_seconds": wall, "method": "ties" if method == "evolve" else method}
        if method == "evolve":
            compute["fitness_evaluations"] = 160
        elif method in ("dam", "adamerging"):
            compute["backward_passes"] = 900
        rows.append(Row(name, group, [record, record], [compute, compute]))
    return rows


def test_report_plots_are_readable_with_sixteen_methods(tmp_path: Path) -> None:
    """The full comparison's plots: no text overlaps or leaves the canvas, each saved PNG fits
    a screen with a sensible aspect, scores are scaled to the data, learned coefficients form a
    grid with whole-number layer ticks."""
    rows = small_family_rows()
    main = [r for r in rows if r.group != "ablation"]
    merged = [r for r in rows if r.compute]
    scores_plot = scores_figure(main)
    lang = scores_plot.axes[0]
    assert lang.get_xlim()[0] == 0 and lang.get_xlim()[1] < 0.3  # not a fixed 0-1 axis
    assert [label.get_text() for label in lang.get_yticklabels()][-1].count("\n") == 1
    compute_plot = score_vs_compute_figure(merged)
    ax = compute_plot.axes[0]
    assert -0.01 < ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] < 0.2  # 0 in view, not 0-1
    assert sorted(t.get_text() for t in ax.texts) == sorted(r.name for r in merged)
    kinds = [t.get_text() for t in compute_plot.legends[0].texts]
    assert kinds == ["data-free", "learned (DAM, AdaMerging)", "evolutionary search"]
    profiles = {
        r.name: {"lang": [0.3, 0.34], "math": [0.35, 0.31], "sql": [0.36, 0.33]}
        for r in rows
        if r.compute and r.compute[0]["method"] in ("dam", "adamerging")
    }
    coefficients = coefficients_figure(profiles)
    panels = [a for a in coefficients.axes if a.axison]
    assert len(panels) == len(profiles) == 10
    for figure in (scores_plot, compute_plot, coefficients):
        assert_readable(figure)
    for panel in panels:
        panel.figure.draw_without_rendering()
        assert [t.get_text() for t in drawn_tick_labels(panel.xaxis)] == ["0", "1"]
    paths = draw_plots(rows, profiles, tmp_path)
    assert paths == ["scores.png", "score_vs_compute.png", "coefficients.png"]
    for name in paths:
        assert_png_fits(tmp_path / name)


def test_plots_are_redrawn_from_report_json_alone(tmp_path: Path) -> None:
    """report.json holds what the plots need (coefficient profiles included): redrawing from it,
    with the cells gone, writes the same PNGs byte for byte."""
    rows = small_family_rows()
    profiles = {"DAM": {"lang": [0.3, 0.34], "math": [0.35, 0.31], "sql": [0.36, 0.33]}}
    first = tmp_path / "first"
    draw_plots(rows, profiles, first)
    data = {
        "rows": [
            {"name": r.name, "group": r.group, "scores": r.scores, "compute": r.compute}
            for r in rows
        ],
        "coefficients": profiles,
    }
    again = tmp_path / "again"
    again.mkdir()
    (again / "report.json").write_text(json.dumps(data))
    assert redraw_plots(again) == ["scores.png", "score_vs_compute.png", "coefficients.png"]
    for name in ("scores.png", "score_vs_compute.png", "coefficients.png"):
        assert (again / name).read_bytes() == (first / name).read_bytes()

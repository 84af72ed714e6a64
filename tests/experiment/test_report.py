"""The report: mean ± std over seeds, the three tables, and the files written."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from dammerge.experiment.config import ExperimentConfig
from dammerge.experiment.report import collect_rows, fmt, write_report
from dammerge.experiment.runner import Cell


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
    assert "| Soups | 0.400 | 0.300 | 0.200 | 0.300 | 0.250 | 1 |" in text
    assert "| KL | 0.500 | 0.000 |" in text  # ablation: averages 0.5 and 0.5
    assert "| Soups | 1.5 | 1,024 |" in text
    data = json.loads((report / "report.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["base", "Soups", "KL"]
    for plot in ("scores.png", "score_vs_compute.png"):
        assert (report / plot).stat().st_size > 1000
    assert "<table>" in (report / "report.html").read_text()

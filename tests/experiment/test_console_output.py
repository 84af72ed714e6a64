"""What `dammerge experiment` prints: nothing while it validates its cells, and the report as
tables (not raw Markdown folded at 80 columns)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dammerge.cli import main
from dammerge.experiment.report import print_report
from dammerge.experiment.runner import Cell, validate_cells
from dammerge.testing import make_family

LONG_NAME = "Evolve (CMA-ES over TIES, 800 evaluations, three seeds)"
SPREAD = ["0.018 ± 0.003", "0.010 ± 0.018"]
TABLES = {
    "scores": {
        "title": "Held-out scores (mean ± std over seeds)",
        "header": ["model / method", "lang", "math", "sql", "average", "compositional", "runs"],
        "rows": [
            ["base", "0.091", "0.000", "0.000", "0.030", "0.000", "1"],
            [LONG_NAME, "0.050 ± 0.007", "0.005 ± 0.009", "0.000 ± 0.000", *SPREAD, "3"],
        ],
    },
    "compute": {
        "title": "Compute per merge",
        "header": ["method", "wall s (mean)", "peak RSS MiB (max)", "forward_passes"],
        "rows": [[LONG_NAME, "315.6 ± 0.9", "865", "38,448"]],
    },
}


def write_report(folder: Path) -> Path:
    folder.mkdir(parents=True)
    data = {"name": "tiny", "date": "2026-12-04 10:00 UTC", "machine": "x86_64, 2 cores"}
    (folder / "report.json").write_text(json.dumps({**data, "tables": TABLES}))
    (folder / "report.md").write_text("# Experiment: tiny\n\n| raw | markdown |\n|---|---|\n")
    return folder


def assert_tables_printed_whole(out: str) -> None:
    lines = out.splitlines()
    assert not any(line.startswith(("#", "|")) or "---|" in line for line in lines), out
    for table in TABLES.values():
        assert any(table["title"] in line for line in lines)
        for row in table["rows"]:
            # each row on one line, every cell in order: nothing folded onto a second line
            assert any(all(cell in line for cell in row) for line in lines), (row, out)
    assert max(len(line) for line in lines) > 80  # wider than the 80 columns of old


def test_a_report_prints_as_tables_at_their_width(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    print_report(write_report(tmp_path / "report"))
    assert_tables_printed_whole(capsys.readouterr().out)


def test_the_experiment_command_prints_the_report_tables(tmp_path, capfd, monkeypatch):
    import dammerge.experiment.runner as runner

    report = write_report(tmp_path / "out" / "report")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("family: fam\nmethods: [{name: a, recipe: {merge_method: linear}}]\n")
    monkeypatch.setattr(runner, "run_experiment", lambda config, out, rerun=False: report)
    monkeypatch.setattr(sys, "argv", ["dammerge", "experiment", str(experiment)])
    monkeypatch.setenv("COLUMNS", "80")
    main()
    captured = capfd.readouterr()
    assert_tables_printed_whole(captured.out)
    assert captured.err.strip() == f"report written to {report}"


@pytest.fixture(scope="module")
def dam_cell(tmp_path_factory) -> Cell:
    root = tmp_path_factory.mktemp("cells")
    base, sources = make_family(root, "llama", n=2, num_hidden_layers=2)
    models = []
    for index, source in enumerate(sources):
        data = root / f"d{index}.jsonl"
        record = {"instruction": "w5 w6", "input": "", "output": "w7 w8 w9"}
        data.write_text(json.dumps(record) + "\n")
        models.append({"model": str(source), "dataset": {"path": str(data)}})
    recipe = {
        "merge_method": "dam",
        "base_model": str(base),
        "models": models,
        "training": {"steps": 2, "distributed": "shard"},  # one process: a note when verbose
    }
    return Cell("DAM", "main", root / "out" / "cells" / "dam" / "seed-0", 0, recipe)


def test_validating_the_cells_prints_nothing(dam_cell, capfd):
    """The validation is a dry run of each merge: its plan, notes and "dry run" line are
    for `dammerge merge --dry-run`, not for an experiment about to train."""
    validate_cells([dam_cell], "cpu")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not dam_cell.folder.exists()


def test_the_same_dry_run_speaks_when_asked(dam_cell, capfd):
    """The reference: the dry run of `dammerge merge --dry-run` does print plan and notes."""
    from dammerge.dispatch import merge

    merge(dam_cell.recipe, dam_cell.model, dry_run=True, progress=True)
    err = capfd.readouterr().err
    assert "dry run: nothing trained or written" in err
    assert "no effect in one process" in err

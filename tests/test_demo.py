"""`dammerge demo --size micro`, the fast first run: the quick demo's every method, end to end."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dammerge.demo import SHIPPED, run_demo
from dammerge.errors import DammergeError
from dammerge.experiment.config import ExperimentConfig


def method_names(name: str) -> list[str]:
    return [m.name for m in ExperimentConfig.from_yaml(SHIPPED / f"{name}.yaml").methods]


def test_micro_experiment_runs_every_method_of_the_quick_demo() -> None:
    micro = ExperimentConfig.from_yaml(SHIPPED / "micro.yaml")
    quick = ExperimentConfig.from_yaml(SHIPPED / "quick.yaml")
    assert micro.build is not None and micro.build.size == "micro"
    assert quick.build is not None and micro.build.regime == quick.build.regime == "far"
    assert method_names("micro") == method_names("quick")
    kinds = [m.recipe["merge_method"] for m in micro.methods]
    assert kinds == [m.recipe["merge_method"] for m in quick.methods]
    assert micro.evaluation.limit is not None and quick.evaluation.limit is not None
    assert micro.evaluation.limit < quick.evaluation.limit  # tiny budgets
    evolve = next(m for m in micro.methods if m.recipe["merge_method"] == "evolve")
    quick_evolve = next(m for m in quick.methods if m.recipe["merge_method"] == "evolve")
    assert evolve.recipe["training"]["budget"] < quick_evolve.recipe["training"]["budget"]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"size": "tiny"}, "unknown demo size 'tiny'"), ({"size": "micro", "full": True}, "--full")],
)
def test_bad_demo_options_fail_before_anything_is_written(
    tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(DammergeError, match=message):
        run_demo(tmp_path / "demo", **options)
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_micro_demo_end_to_end(micro_family: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """`dammerge demo OUT --size micro` through the console entry point: the family (a cached
    copy of the session's micro build), every method merged and scored, the report printed and
    written with every method in it."""
    from dammerge.cli import main

    out = tmp_path / "demo"
    shutil.copytree(micro_family, out / "family-micro")
    weights = out / "family-micro" / "base" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    monkeypatch.setattr(sys, "argv", ["dammerge", "demo", str(out), "--size", "micro"])
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = out / "micro" / "report"
    text = (report / "report.md").read_text()
    rows = ["base", "lang", "math", "sql", *method_names("micro")]
    for row in rows:
        assert f"| {row} |" in text and row in printed, row
    data = json.loads((report / "report.json").read_text())
    assert [r["name"] for r in data["rows"]] == rows
    assert list(data["coefficients"]) == ["DAM"]
    for plot in ("scores.png", "score_vs_compute.png", "coefficients.png"):
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert weights.stat().st_mtime_ns == built  # the cached family was used, not rebuilt

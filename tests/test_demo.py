"""`dammerge demo`: the fast first run on micro (the quick demo's every method, end to end), the
regime's own folders, and the options refused before any work."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import dammerge.demo as demo
from dammerge.demo import DEMO_REGIME, SHIPPED, run_demo
from dammerge.errors import DammergeError
from dammerge.experiment.config import ExperimentConfig
from dammerge.family.build import SIZES

from .cli_helpers import run_cli


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": "micro", "regime": "mid"}, "unknown family regime 'mid'"),
        ({"full": True, "regime": "mid"}, "unknown family regime 'mid'"),
        ({"regime": "near"}, "family size 'small' has no near regime"),
        ({"full": True}, "family size 'small' has no near regime"),
    ],
)
def test_a_regime_without_a_recipe_stops_before_any_work(
    tmp_path: Path, monkeypatch, capsys, options: dict, message: str
) -> None:
    """An unknown regime, or one the small family has no recipe for (`--full` asks for both):
    one error line and one hint through the command line, nothing built, run or written. The
    small size is given no near recipe here, whatever the build module ships."""
    monkeypatch.setitem(SIZES, "small", replace(SIZES["small"], near=None))

    def no_work(*args: object) -> None:
        raise AssertionError("an experiment started")

    monkeypatch.setattr(demo, "run_regime", no_work)
    with pytest.raises(DammergeError, match=message) as caught:
        run_demo(tmp_path / "demo", **options)
    assert caught.value.hint
    if "full" in options and "near" in message:
        assert "--regime far" in caught.value.hint  # how to run the regime that exists
    args = [f"--{key}" if value is True else f"--{key}={value}" for key, value in options.items()]
    assert run_cli(monkeypatch, "demo", tmp_path / "demo", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["error", "hint"], err
    assert message in err[0]
    assert not (tmp_path / "demo").exists()


def test_each_regime_has_its_own_folders_and_the_default_is_the_demo_regime(
    tmp_path: Path, monkeypatch
) -> None:
    """The family and the report of each regime go to folders named after it, so that both
    regimes live side by side in one output folder; no --regime means DEMO_REGIME."""
    calls = []
    monkeypatch.setattr(demo, "run_regime", lambda *args: calls.append(args) or Path("report"))
    out = tmp_path / "demo"
    run_demo(out, size="micro")
    run_demo(out, size="micro", regime="near")
    run_demo(out, regime="far")
    assert calls == [
        (out, "micro", "family-micro", DEMO_REGIME),
        (out, "micro", "family-micro", "near"),
        (out, "quick", "family", "far"),
    ]


def test_full_runs_the_comparison_in_each_regime_then_writes_the_summary(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`--full`: small-family.yaml once per regime, each into its own folders, then one summary
    of both (the experiments are stood in for by reports written here: their averages are
    set so that near's best single model is lang at 0.5 and far's is sql at 0.3)."""
    monkeypatch.setitem(SIZES, "small", replace(SIZES["small"], near=SIZES["micro"].near))
    rows = {  # (name, group, average) of each regime's report
        "near": [
            ("base", "reference", 0.3),
            ("lang", "reference", 0.5),
            ("Model Soups", "main", 0.55),
        ],
        "far": [
            ("base", "reference", 0.1),
            ("sql", "reference", 0.3),
            ("Model Soups", "main", 0.02),
            ("KL", "ablation", 0.2),
        ],
    }
    calls = []

    def fake_regime(output: Path, experiment: str, family: str, regime: str) -> Path:
        calls.append((experiment, family, regime))
        report = output / f"{experiment}-{regime}" / "report"
        report.mkdir(parents=True)
        records = [{"name": n, "group": g, "scores": [{"average": a}]} for n, g, a in rows[regime]]
        (report / "report.json").write_text(json.dumps({"rows": records}))
        return report

    monkeypatch.setattr(demo, "run_regime", fake_regime)
    summary = run_demo(tmp_path / "demo", full=True)
    assert calls == [("small-family", "family", "near"), ("small-family", "family", "far")]
    assert summary == tmp_path / "demo" / "small-family-summary.md"
    text = summary.read_text()
    for line in (
        "| near | best single: lang | 0.500 |  |",
        "| near | Model Soups | 0.550 | +0.050 |",
        "| far | best single: sql | 0.300 |  |",
        "| far | Model Soups | 0.020 | -0.280 |",
    ):
        assert line in text, text
    assert "KL" not in text  # the ablation stays in each regime's report
    assert "`small-family-near/report/`, `small-family-far/report/`" in text
    printed = capsys.readouterr().out
    assert "best single: lang" in printed and "-0.280" in printed


def test_full_checks_every_regime_s_report_folder_before_any_work(
    tmp_path: Path, monkeypatch
) -> None:
    """The far report folder holds something else: refused before the near half runs."""
    monkeypatch.setitem(SIZES, "small", replace(SIZES["small"], near=SIZES["micro"].near))
    monkeypatch.setattr(demo, "run_regime", lambda *args: pytest.fail("an experiment started"))
    taken = tmp_path / "demo" / "small-family-far"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(DammergeError, match="is not an experiment's folder"):
        run_demo(tmp_path / "demo", full=True)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["small-family-far"]
    assert (taken / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_micro_demo_end_to_end(micro_family: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """`dammerge demo OUT --size micro --regime far` through the console entry point: the family
    (a cached copy of the session's micro build), every method merged and scored, the report
    printed and written with every method in it."""
    from dammerge.cli import main

    out = tmp_path / "demo"
    shutil.copytree(micro_family, out / "family-micro-far")
    weights = out / "family-micro-far" / "base" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    argv = ["dammerge", "demo", str(out), "--size", "micro", "--regime", "far"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = out / "micro-far" / "report"
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


@pytest.mark.slow
def test_micro_demo_near_builds_its_own_family_beside_the_far_one(
    micro_family: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`dammerge demo OUT --size micro --regime near` into a folder that already holds the far
    demo's family: the near family is built into its own folder (the far one left as it was),
    and the report, in its own folder, names the regime and the best single model."""
    out = tmp_path / "demo"
    shutil.copytree(micro_family, out / "family-micro-far")
    far_weights = out / "family-micro-far" / "base" / "model.safetensors"
    before = far_weights.stat().st_mtime_ns
    code = run_cli(monkeypatch, "demo", out, "--size", "micro", "--regime", "near")
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    near = json.loads((out / "family-micro-near" / "manifest.json").read_text())
    assert (near["size"], near["regime"]) == ("micro", "near")
    assert far_weights.stat().st_mtime_ns == before
    assert json.loads((out / "family-micro-far" / "manifest.json").read_text())["regime"] == "far"
    report = out / "micro-near" / "report"
    data = json.loads((report / "report.json").read_text())
    assert data["regime"] == "near"
    assert data["family"] == str(out / "family-micro-near")
    references = [r for r in data["rows"] if r["group"] == "reference"]
    averages = {r["name"]: r["scores"][0]["average"] for r in references}
    assert data["best_single"]["name"] == max(averages, key=averages.__getitem__)
    rows = ["base", "lang", "math", "sql", *method_names("micro")]
    assert [r["name"] for r in data["rows"]] == rows
    assert "regime: near" in (report / "report.md").read_text() and "regime: near" in printed
    assert not (out / "micro-far").exists()

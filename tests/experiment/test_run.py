"""`dammerge experiment` end to end on the micro family: cells, report, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dammerge.errors import DammergeError
from dammerge.experiment.config import ExperimentConfig
from dammerge.experiment.runner import family_regime, run_experiment
from dammerge.family.manifest import Family

from ..cli_helpers import run_cli


def experiment(family: Path, methods: list[dict], **extra) -> dict:
    return {
        "name": "tiny",
        "family": str(family),
        "seeds": [0],
        "references": ["base", "math"],
        "evaluation": {"limit": 2, "batch_size": 4, "max_new_tokens": 8},
        "methods": methods,
        **extra,
    }


SOUPS = {"name": "Soups", "recipe": {"merge_method": "linear", "parameters": {"weight": 1.0}}}
TIES = {
    "name": "TIES",
    "recipe": {"merge_method": "ties", "parameters": {"weight": 1, "density": 0.5}},
}
DAM = {
    "name": "DAM",
    "recipe": {"merge_method": "dam", "training": {"steps": 3, "checkpoint_every": 1}},
    "dataset": {"samples": 3},
}
EVOLVE = {
    "name": "Evolve",
    "recipe": {
        "merge_method": "evolve",
        "parameters": {"method": "linear"},
        "training": {"budget": 4, "popsize": 2, "layer_groups": 1, "samples": 2},
    },
}


@pytest.mark.slow
def test_experiment_runs_every_method_and_reports(micro_family: Path, tmp_path: Path) -> None:
    config = ExperimentConfig.model_validate(experiment(micro_family, [SOUPS, DAM, EVOLVE]))
    report = run_experiment(config, tmp_path / "out", progress=False)
    text = (report / "report.md").read_text()
    for row in ("| base |", "| math |", "| Soups |", "| DAM |", "| Evolve |"):
        assert row in text
    assert "Compute per merge" in text
    for plot in ("scores.png", "score_vs_compute.png", "coefficients.png"):
        assert (report / plot).is_file()
    dam = tmp_path / "out" / "cells" / "dam" / "seed-0"
    assert (dam / "model" / "dam_coefficients.safetensors").is_file()
    assert (dam / "merge.json").is_file() and (dam / "scores.json").is_file()

    # A cell whose records vanished (as after a kill) is the only one recomputed.
    soups = tmp_path / "out" / "cells" / "soups"
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cells").rglob("*.json")}
    (dam / "merge.json").unlink()
    (dam / "scores.json").unlink()
    run_experiment(config, tmp_path / "out", progress=False)
    for path, mtime in kept.items():
        if not path.is_relative_to(dam):
            assert path.stat().st_mtime_ns == mtime, path
    assert (dam / "scores.json").is_file() and (soups / "scores.json").is_file()

    # A method whose recipe changed in the experiment file is recomputed; the others are not.
    changed = experiment(micro_family, [SOUPS, DAM, EVOLVE])
    changed["methods"][0] = {
        **SOUPS,
        "recipe": {"merge_method": "linear", "parameters": {"weight": 2.0}},
    }
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cells").rglob("*.json")}
    run_experiment(ExperimentConfig.model_validate(changed), tmp_path / "out", progress=False)
    for path, mtime in kept.items():
        redone = path.stat().st_mtime_ns != mtime
        assert redone == path.is_relative_to(soups), path
    assert "weight: 2.0" in (soups / "model" / "dammerge_config.yml").read_text()


@pytest.mark.slow
def test_rerun_recomputes_finished_cells(micro_family: Path, tmp_path: Path) -> None:
    """`--rerun` (``rerun=True``) merges and evaluates every cell again."""
    config = ExperimentConfig.model_validate(experiment(micro_family, [SOUPS]))
    run_experiment(config, tmp_path / "out", progress=False)
    records = sorted((tmp_path / "out" / "cells").rglob("*.json"))
    assert any(p.name == "merge.json" for p in records)
    before = {p: p.stat().st_mtime_ns for p in records}
    run_experiment(config, tmp_path / "out", progress=False)  # nothing to do
    assert {p: p.stat().st_mtime_ns for p in records} == before
    run_experiment(config, tmp_path / "out", rerun=True, progress=False)
    assert all(p.stat().st_mtime_ns != before[p] for p in records)


@pytest.mark.slow
def test_killed_experiment_finishes_only_missing_cells(micro_family: Path, tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(micro_family, [SOUPS, TIES])))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dammerge.cli", "experiment", str(path), "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "cells" / "soups" / "merge.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.exists(), process.stderr.read().decode() if process.poll() is not None else ""
    process.send_signal(signal.SIGKILL)
    process.wait()
    mtime = first.stat().st_mtime_ns
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert first.stat().st_mtime_ns == mtime  # the finished merge was not redone
    assert (out / "cells" / "ties" / "scores.json").is_file()
    assert (out / "report" / "report.md").is_file()


@pytest.mark.parametrize(
    ("manifest", "regime"),
    [
        ({"regime": "near", "dammerge_version": "0.1"}, "near"),
        ({"regime": "far", "dammerge_version": "0.1"}, "far"),
        ({"dammerge_version": "0.1"}, "far"),  # built before there were two regimes
        ({}, None),  # a family assembled by hand in the family format
    ],
)
def test_the_report_takes_the_regime_from_the_family_manifest(manifest, regime) -> None:
    family = Family(Path("fam"), manifest, domains={}, compositional=None)
    assert family_regime(family) == regime


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"name": "Bad", "recipe": {"merge_method": "frobnicate"}}, "cell 'Bad'.*frobnicate"),
        (
            {"name": "DAM typo", "recipe": {"merge_method": "dam", "training": {"lamda": 1}}},
            "cell 'DAM typo \\(seed 0\\)'.*lamda",
        ),
    ],
)
def test_bad_methods_fail_before_compute(
    micro_family: Path, tmp_path: Path, method: dict, message: str
) -> None:
    config = ExperimentConfig.model_validate(experiment(micro_family, [SOUPS, method]))
    with pytest.raises(DammergeError, match=message):
        run_experiment(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "cells").exists()


def test_missing_dataset_and_unloadable_model_are_named(micro_family: Path, tmp_path: Path) -> None:
    import shutil

    family = tmp_path / "family"
    shutil.copytree(micro_family, family)
    (family / "data" / "sql" / "train.jsonl").unlink()
    config = ExperimentConfig.model_validate(experiment(family, [SOUPS, DAM]))
    with pytest.raises(DammergeError, match="cell 'DAM \\(seed 0\\)'"):
        run_experiment(config, tmp_path / "out", progress=False)
    (family / "math" / "config.json").unlink()
    config = ExperimentConfig.model_validate(experiment(family, [SOUPS]))
    with pytest.raises(DammergeError, match="math"):
        run_experiment(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "cells").exists()


class _Computed(Exception):
    """Raised by the stand-in for the first compute step: the output checks let the run go."""


@pytest.fixture
def experiment_file(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """An experiment file, with the run's first compute step (the family) replaced by a
    recorder that stops the run: the list says whether the run got past its output checks."""
    import dammerge.experiment.runner as runner

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp_path / "family", [SOUPS])))
    computed: list[str] = []

    def family(config):
        computed.append(config.family)
        raise _Computed

    monkeypatch.setattr(runner, "_family", family)
    return path, computed


def test_unwritable_output_folders_are_refused_before_compute(
    experiment_file, unwritable_folder, monkeypatch, capsys
) -> None:
    path, computed = experiment_file
    for out in (unwritable_folder, unwritable_folder / "new"):
        code = run_cli(monkeypatch, "experiment", path, "-o", out)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot write" in errors[0], err
    assert computed == []


def test_a_folder_of_something_else_is_refused_and_left_alone(
    experiment_file, tmp_path, monkeypatch, capsys
) -> None:
    path, computed = experiment_file
    checkpoint = tmp_path / "merged-model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    code = run_cli(monkeypatch, "experiment", path, "-o", checkpoint)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "error:" in err and "not an experiment's folder" in err
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    assert computed == []


def test_new_empty_and_earlier_experiment_folders_are_accepted(experiment_file, tmp_path) -> None:
    path, computed = experiment_file
    config = ExperimentConfig.from_yaml(path)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "experiment.json").write_text(json.dumps(config.model_dump(mode="json")))
    (earlier / "cells").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "run", empty, earlier):
        with pytest.raises(_Computed):
            run_experiment(config, out, progress=False)
    assert len(computed) == 3

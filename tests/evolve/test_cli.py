"""`dammerge merge RECIPE OUT` runs an evolve recipe; bad input is one error line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from .evolve_helpers import evolve_recipe


def _dammerge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dammerge.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_merge_runs_an_evolve_recipe(sources, tmp_path):
    recipe = evolve_recipe(sources, budget=8, popsize=4, samples=2)
    # relative dataset paths are read against the recipe's folder
    (tmp_path / "a.jsonl").write_text(sources.data_a.read_text())
    recipe["models"][0]["dataset"] = {"path": "a.jsonl"}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))

    done = _dammerge("merge", str(path), str(tmp_path / "out"), "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert "evolved merge written to" in done.stderr
    assert (tmp_path / "out" / "evolved_recipe.yml").is_file()

    recipe["training"]["budget"] = 2
    path.write_text(yaml.safe_dump(recipe))
    bad = _dammerge("merge", str(path), str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert "error: training.budget (2) is smaller than the population (4)" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()

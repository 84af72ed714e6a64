"""Every file in ``examples/`` works as written: each recipe passes ``dammerge merge RECIPE OUT
--dry-run`` through the console entry point, and each experiment file validates every one of
its cells, against tiny checkpoints laid out where the examples expect them.

The examples point at ``./family/...``, the folder ``dammerge family build family`` writes. The
fixture builds that folder from the tiny Llama family (copies, so the manifest's paths stay
inside it) with enough Alpaca records per domain for the recipes' ``samples``, copies the
examples next to it unchanged, and runs from there, as a user runs them from the repository.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from dammerge.cli import main
from dammerge.experiment.config import ExperimentConfig
from dammerge.experiment.runner import plan_cells, validate_cells
from dammerge.family.manifest import FORMAT, load_family

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(EXAMPLES.glob("*.yaml"))
EXPERIMENTS = sorted((EXAMPLES / "experiments").glob("*.yaml"))
DOMAINS = ("lang", "math", "sql")
RECORDS_PER_DOMAIN = 300  # the recipes ask for at most 256 samples per model
REQUIRED_METHODS = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "della",
    "breadcrumbs",
    "slerp",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
    "dam",
    "adamerging",
    "evolve",
}


def _record(domain: str, number: int) -> dict[str, str]:
    """An Alpaca record in the family format, over the tiny tokenizer's words (w3 .. w124)."""
    words = " ".join(f"w{3 + (number * 7 + k) % 120}" for k in range(6))
    record = {
        "id": f"{domain}-{number}",
        "domain": domain,
        "instruction": f"w{3 + number % 100} {words}",
        "input": "" if number % 2 else words,
        "output": f"{words} {number}",
    }
    if domain == "math":
        record["answer"] = str(number)
    if domain == "sql":
        record["context"] = "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);"
    return record


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_family(root: Path, base: Path, specialists: list[Path]) -> Path:
    """A family folder in the documented format (docs/family-format.md) from tiny checkpoints."""
    family = root / "family"
    shutil.copytree(base, family / "base")
    for domain, model in zip(DOMAINS, specialists, strict=True):
        shutil.copytree(model, family / domain)
        records = [_record(domain, n) for n in range(RECORDS_PER_DOMAIN)]
        _write_jsonl(family / "data" / domain / "train.jsonl", records)
        _write_jsonl(family / "data" / domain / "eval.jsonl", records[:8])
    metrics = {"lang": "translation", "math": "exact_match", "sql": "execution"}
    manifest = {
        "format": FORMAT,
        "size": "tiny",
        "seed": 0,
        "models": {name: name for name in ("base", *DOMAINS)},
        "domains": {
            d: {
                "specialist": d,
                "train": f"data/{d}/train.jsonl",
                "eval": f"data/{d}/eval.jsonl",
                "metric": metrics[d],
            }
            for d in DOMAINS
        },
    }
    (family / "manifest.json").write_text(json.dumps(manifest))
    return family


@pytest.fixture(scope="module")
def workspace(llama_family, tmp_path_factory) -> Path:
    """A folder holding ``family/`` and an unchanged copy of ``examples/``, as a checkout would."""
    base, specialists = llama_family
    root = tmp_path_factory.mktemp("examples-workspace")
    _write_family(root, base, specialists)
    shutil.copytree(EXAMPLES, root / "examples")
    return root


def _run_cli(monkeypatch, capfd, *args: str) -> tuple[int, str]:
    """``dammerge ARGS`` through the console entry point, in-process."""
    monkeypatch.setattr(sys, "argv", ["dammerge", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def test_examples_folder_holds_only_recipes_experiments_and_its_guide() -> None:
    files = {p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*") if p.is_file()}
    checked = {p.relative_to(EXAMPLES) for p in (*RECIPES, *EXPERIMENTS)}
    assert files - checked == {Path("README.md")}


def test_examples_cover_the_listed_methods_and_explain_themselves() -> None:
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in RECIPES}
    assert methods >= REQUIRED_METHODS
    for path in (*RECIPES, *EXPERIMENTS):
        assert path.read_text().startswith("# "), f"{path.name} starts without a comment"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_passes_dry_run(recipe: Path, workspace: Path, monkeypatch, capfd) -> None:
    monkeypatch.chdir(workspace)
    out = workspace / "out" / recipe.stem
    code, output = _run_cli(
        monkeypatch, capfd, "merge", f"examples/{recipe.name}", str(out), "--dry-run"
    )
    assert code == 0, output
    assert "dry run" in output
    assert "error:" not in output
    assert not out.exists()


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_validates_every_cell(experiment: Path, workspace: Path) -> None:
    copy = workspace / "examples" / "experiments" / experiment.name
    config = ExperimentConfig.from_yaml(copy)
    family = load_family(config.family)
    assert family.root.resolve() == (workspace / "family").resolve()
    cells = plan_cells(config, family, workspace / "runs" / experiment.stem)
    assert {cell.name for cell in cells} >= {m.name for m in config.methods}
    validate_cells(cells, config.device)
    assert not (workspace / "runs").exists()

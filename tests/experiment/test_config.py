"""The experiment file: validation, defaults, and cells expanded from a family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dammerge.errors import ConfigError, DammergeError
from dammerge.experiment.config import ExperimentConfig
from dammerge.experiment.runner import complete_recipe, plan_cells
from dammerge.family.manifest import load_family


def write_family(root: Path) -> Path:
    """A manifest and empty splits: enough for planning, which reads no weights."""
    for name in ("base", "lang", "math", "sql"):
        (root / name).mkdir(parents=True)
    manifest = {
        "format": "dammerge-family/1",
        "models": {n: n for n in ("base", "lang", "math", "sql")},
        "domains": {
            d: {
                "specialist": d,
                "train": f"data/{d}/train.jsonl",
                "eval": f"data/{d}/eval.jsonl",
                "metric": m,
            }
            for d, m in (("lang", "translation"), ("math", "exact_match"), ("sql", "execution"))
        },
        "compositional": {"eval": "data/compositional/eval.jsonl", "metric": "exact_match"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_experiment(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_relative_family_is_resolved_from_the_file(tmp_path: Path) -> None:
    path = write_experiment(
        tmp_path / "exp.yaml",
        "family: fam\nmethods:\n  - {name: Soups, recipe: {merge_method: linear}}\n",
    )
    config = ExperimentConfig.from_yaml(path)
    assert Path(config.family) == (tmp_path / "fam").resolve()
    assert config.seeds == [0, 1, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("family: f\nmethods: []\n", "methods"),
        ("family: f\nmethods:\n  - {name: a, recipe: {}}\n", "merge_method"),
        (
            "family: f\nmethods:\n  - {name: a, recipe: {merge_method: linear, base_model: x}}\n",
            "base_model",
        ),
        ("family: f\nmethod: []\n", "method"),
        (
            "family: f\nmethods:\n  - {name: A b, recipe: {merge_method: linear}}\n"
            "  - {name: a-B, recipe: {merge_method: ties}}\n",
            "unique",
        ),
        ("family: [\n", "valid YAML"),
    ],
)
def test_bad_experiment_files_name_the_cause(tmp_path: Path, text: str, message: str) -> None:
    path = write_experiment(tmp_path / "exp.yaml", text)
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_yaml(path)


def test_unreadable_experiment_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment file not found"):
        ExperimentConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a experiment file"):
        ExperimentConfig.from_yaml(tmp_path)
    binary = tmp_path / "exp.yaml"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ConfigError, match="cannot read experiment file"):
        ExperimentConfig.from_yaml(binary)


def test_cells_fill_models_and_datasets_from_the_family(tmp_path: Path) -> None:
    family = load_family(write_family(tmp_path / "fam"))
    path = write_experiment(
        tmp_path / "exp.yaml",
        "family: fam\nseeds: [3, 4]\nmethods:\n"
        "  - {name: Soups, recipe: {merge_method: linear}}\n"
        "  - {name: DAM, recipe: {merge_method: dam}, dataset: {samples: 8}}\n"
        "  - {name: SLERP math, recipe: {merge_method: slerp, parameters: {t: 0.5}},"
        " sources: [math]}\n",
    )
    config = ExperimentConfig.from_yaml(path)
    cells = plan_cells(config, family, tmp_path / "out")
    labels = [c.label for c in cells]
    assert labels == [
        "base",
        "lang",
        "math",
        "sql",
        "Soups",
        "DAM (seed 3)",
        "DAM (seed 4)",
        "SLERP math",
    ]
    dam = cells[5]
    assert dam.folder == tmp_path / "out" / "cells" / "dam" / "seed-3"
    assert dam.recipe["base_model"] == str((tmp_path / "fam" / "base").resolve())
    assert [m["dataset"] for m in dam.recipe["models"]] == [
        {"path": str((tmp_path / "fam" / "data" / d / "train.jsonl").resolve()), "samples": 8}
        for d in ("lang", "math", "sql")
    ]
    assert len(cells[-1].recipe["models"]) == 1
    assert cells[0].model == (tmp_path / "fam" / "base").resolve()


def test_unknown_source_domain_is_a_clear_error(tmp_path: Path) -> None:
    family = load_family(write_family(tmp_path / "fam"))
    config = ExperimentConfig.model_validate(
        {
            "family": str(tmp_path / "fam"),
            "methods": [{"name": "x", "recipe": {"merge_method": "linear"}, "sources": ["code"]}],
        }
    )
    with pytest.raises(DammergeError, match="no domain 'code'"):
        complete_recipe(config.methods[0], family)


@pytest.mark.parametrize(
    ("name", "size"), [("quick", "small"), ("small-family", "small"), ("micro", "micro")]
)
def test_shipped_experiments_validate_on_a_family(
    name: str, size: str, micro_family: Path, tmp_path: Path
) -> None:
    from dammerge.demo import SHIPPED
    from dammerge.experiment.runner import validate_cells

    config = ExperimentConfig.from_yaml(SHIPPED / f"{name}.yaml")
    assert config.build is not None and config.build.size == size
    family = load_family(micro_family)
    cells = plan_cells(config, family, tmp_path / "out")
    validate_cells(cells, "cpu")  # every recipe accepted by its method, nothing computed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method, seeded",
    [
        ("linear", False),
        ("ties", False),
        ("slerp", False),
        ("breadcrumbs", False),
        ("dare_ties", True),
        ("della_linear", True),
        ("dam", True),
        ("adamerging", True),
        ("evolve", True),
    ],
)
def test_a_method_runs_once_per_seed_only_when_its_result_depends_on_the_seed(
    method: str, seeded: bool
) -> None:
    from dammerge.experiment.config import MethodSpec

    spec = MethodSpec(name=method, recipe={"merge_method": method})
    assert spec.is_seeded is seeded
    assert MethodSpec(
        name=method, recipe={"merge_method": method}, seeded=not seeded
    ).is_seeded is (not seeded)

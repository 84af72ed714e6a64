"""Recipe mistakes are named where they are: the misspelt key with the closest real one, the
unknown method with every method there is, a YAML syntax error with its line and column."""

from __future__ import annotations

import sys

import pytest
import yaml

from dammerge.cli import main
from dammerge.config import MergeConfig
from dammerge.errors import ConfigError, did_you_mean
from dammerge.experiment.config import ExperimentConfig
from dammerge.registry import REGISTRY, get_entry, load_recipe

MODEL = {"model": "a"}


def test_did_you_mean_offers_the_closest_choice_or_nothing():
    choices = ["merge_method", "models", "base_model"]
    assert did_you_mean("merge_methd", choices) == " — did you mean 'merge_method'?"
    assert did_you_mean("modles", choices) == " — did you mean 'models'?"
    assert did_you_mean("zzzzzz", choices) == ""


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (
            {"merge_methd": "linear", "models": [MODEL]},
            "recipe: unknown key 'merge_methd' — did you mean 'merge_method'?",
        ),
        (
            {"merge_method": "linear", "modles": [MODEL]},
            "recipe: unknown key 'modles' — did you mean 'models'?",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a", "paramters": {}}]},
            "recipe: models.0: unknown key 'paramters' — did you mean 'parameters'?",
        ),
        (
            {"merge_method": "dam", "models": [{"model": "a", "dataset": {"pth": "d.jsonl"}}]},
            "recipe: models.0.dataset: unknown key 'pth' — did you mean 'path'?",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1], "parameter": {}}]}],
            },
            "recipe: slices.0.sources.0: unknown key 'parameter' — did you mean 'parameters'?",
        ),
        (
            {"merge_method": "linear", "models": [MODEL], "xyzzy": 1},
            "recipe: unknown key 'xyzzy'",
        ),
    ],
)
def test_a_misspelt_key_is_named_with_the_closest_real_one(recipe, expected):
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict(recipe)
    assert info.value.message == expected
    assert "Field required" not in info.value.message


def test_the_hint_lists_the_keys_of_the_block_with_the_typo():
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict({"merge_method": "linear", "models": [{"model": "a", "wieght": 1}]})
    assert info.value.hint == "the keys here: model, parameters, dataset"


@pytest.mark.parametrize(
    ("method", "training", "expected"),
    [
        (
            "dam",
            {"lamda_cos": 0.1},
            "training: unknown key 'lamda_cos' — did you mean 'lambda_cos'?",
        ),
        ("adamerging", {"stesp": 3}, "training: unknown key 'stesp' — did you mean 'steps'?"),
        ("evolve", {"popsise": 4}, "training: unknown key 'popsise' — did you mean 'popsize'?"),
    ],
)
def test_a_misspelt_training_key_is_named(method, training, expected):
    recipe = {"merge_method": method, "models": [MODEL], "training": training}
    if method == "evolve":
        recipe["parameters"] = {"method": "ties"}
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert info.value.message == expected


def test_an_unknown_method_lists_every_registered_method_and_suggests_one():
    with pytest.raises(ConfigError) as info:
        get_entry("tiez")
    assert info.value.message == "unknown merge_method 'tiez' — did you mean 'ties'?"
    listed = info.value.hint.removeprefix("choose one of: ").split(", ")
    assert listed == sorted(REGISTRY)
    assert {"dam", "adamerging", "evolve", "linear", "ties"} <= set(listed)


def test_a_misspelt_parameter_suggests_the_closest():
    recipe = {"merge_method": "ties", "models": [{"model": "a", "parameters": {"densty": 0.5}}]}
    with pytest.raises(ConfigError, match=r"unknown parameter 'densty'.* — did you mean 'density'"):
        load_recipe(recipe)


@pytest.mark.parametrize(
    ("text", "line", "column", "problem"),
    [
        # an unclosed flow mapping: the parser stops at the ':' of the next entry
        (
            "merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1\n  - model: b\n",
            5,
            10,
            "expected ',' or '}', but got ':'",
        ),
        # a key indented one space less than its sibling
        ("merge_method: ties\nmodels:\n  - model: a\n   bad: 1\n", 4, 4, "expected <block end>"),
        # a tab where YAML wants spaces
        ("merge_method: ties\nmodels:\n\t- model: a\n", 3, 1, "found character '\\t'"),
    ],
)
def test_a_yaml_syntax_error_keeps_its_line_and_column(tmp_path, text, line, column, problem):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)  # the reference: PyYAML refuses it too
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_yaml(path)
    message = info.value.message
    assert message.startswith(f"{path} is not valid YAML: line {line}, column {column}: ")
    assert problem in message and "\n" not in message


def test_an_experiment_file_with_a_misspelt_key(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(
        "family: f\nseed: [0, 1]\nmethods: [{name: a, recipe: {merge_method: linear}}]\n"
    )
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml(path)
    assert info.value.message == f"{path}: unknown key 'seed' — did you mean 'seeds'?"


def test_the_command_line_names_the_misspelt_key(tmp_path, monkeypatch, capfd):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_methd: linear\nmodels:\n  - model: a\n")
    monkeypatch.setattr(sys, "argv", ["dammerge", "merge", str(recipe), str(tmp_path / "out")])
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as info:
        main()
    captured = capfd.readouterr()
    assert info.value.code == 2 and captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines[0] == f"error: {recipe}: unknown key 'merge_methd' — did you mean 'merge_method'?"
    assert lines[1].startswith("hint: the keys here: merge_method, ")
    assert len(lines) == 2
    assert not (tmp_path / "out").exists()

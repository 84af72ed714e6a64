"""The dataset block: fields per template, and its place in a recipe."""

from __future__ import annotations

import pytest

from dammerge.config import MergeConfig
from dammerge.data.spec import DatasetSpec, require_dataset
from dammerge.errors import ConfigError


def test_unknown_field_name_rejected():
    with pytest.raises(ValueError, match="unknown field 'question'"):
        DatasetSpec(path="x", fields={"question": "q"})


def test_required_fields_leave_out_the_optional_input():
    assert DatasetSpec(path="x").required_fields() == ["instruction", "output"]
    assert DatasetSpec(path="x", fields={"input": "ctx"}).required_fields() == [
        "instruction",
        "output",
    ]
    assert DatasetSpec(path="x", template="raw").required_fields() == ["text"]
    with pytest.raises(ValueError, match="unknown field 'output' for template raw"):
        DatasetSpec(path="x", template="raw", fields={"output": "o"})


def test_a_missing_dataset_names_the_model_and_what_needs_it():
    spec = DatasetSpec(path="x")
    assert require_dataset("./math", spec, "learned merging") is spec
    with pytest.raises(ConfigError, match=r"model \./math has no dataset, which fitness: kl"):
        require_dataset("./math", None, "fitness: kl")


def test_a_recipe_types_its_dataset_blocks(tmp_path):
    (tmp_path / "data").mkdir()
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        "merge_method: dam\nmodels:\n"
        "  - {model: a, dataset: {path: data/a.jsonl, template: chat, samples: 4}}\n"
        "  - {model: b}\n"
    )
    config = MergeConfig.from_yaml(recipe)
    dataset = config.models[0].dataset
    assert isinstance(dataset, DatasetSpec) and dataset.template == "chat"
    assert dataset.path == str(tmp_path / "data" / "a.jsonl")  # relative to the recipe
    assert config.models[1].dataset is None
    # written back as stated: no defaults added
    written = config.model_dump(exclude_none=True)["models"][0]["dataset"]
    assert written == {"path": str(tmp_path / "data" / "a.jsonl"), "template": "chat", "samples": 4}


def test_a_bad_dataset_block_fails_when_the_recipe_loads():
    models = [{"model": "a", "dataset": {"path": "d.jsonl", "fields": {"question": "q"}}}]
    with pytest.raises(ConfigError, match=r"models\.0\.dataset: unknown field 'question'"):
        MergeConfig.from_dict({"merge_method": "dam", "models": models})
    models = [{"model": "a", "dataset": {"path": "d.jsonl", "shuffle": True}}]
    with pytest.raises(ConfigError, match=r"models\.0\.dataset: unknown key 'shuffle'"):
        MergeConfig.from_dict({"merge_method": "evolve", "models": models})

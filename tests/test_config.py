"""The recipe: YAML parsing, validation, and per-tensor resolution of parameter values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dammerge.config import (
    MergeConfig,
    ModelReference,
    interpolate_gradient,
    parse_dtype,
    resolve_value,
)
from dammerge.errors import ConfigError

NAME = "model.layers.3.self_attn.q_proj.weight"


def brute_gradient(values: list[float], t: float) -> float:
    """Evenly spaced knots at i/(n−1), joined by straight lines (found by scanning segments)."""
    n = len(values)
    if n == 1:
        return values[0]
    for i in range(n - 1):
        lo, hi = i / (n - 1), (i + 1) / (n - 1)
        if lo <= t <= hi:
            return values[i] + (values[i + 1] - values[i]) * (t - lo) / (hi - lo)
    raise AssertionError(t)


@pytest.mark.parametrize("values", [[0.2, 0.8], [0.0, 1.0, 0.0], [1, 0.5, 0.3, 0.7, 0], [0.4]])
def test_gradient_interpolates_linearly_over_depth(values):
    for t in np.linspace(0.0, 1.0, 41):
        got = resolve_value(values, NAME, float(t))
        assert got == pytest.approx(brute_gradient([float(v) for v in values], float(t)))
    assert interpolate_gradient([float(v) for v in values], 0.0) == pytest.approx(values[0])
    assert interpolate_gradient([float(v) for v in values], 1.0) == pytest.approx(values[-1])


def test_scalars_are_themselves():
    assert resolve_value(0.5, NAME, 0.3) == 0.5
    assert resolve_value(True, NAME, 0.3) is True
    assert resolve_value("l1", NAME, 0.3) == "l1"


def test_filters_pick_the_first_match_and_default():
    value = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": 0.1}, {"value": 0.3}]
    assert resolve_value(value, NAME, 0.0) == 0.7
    assert resolve_value(value, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.1
    assert resolve_value(value, "model.embed_tokens.weight", 0.0) == 0.3


def test_filters_without_default_resolve_to_none():
    assert resolve_value([{"filter": "mlp", "value": 1.0}], NAME, 0.5) is None


def test_filter_values_may_be_gradients():
    value = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": [1.0, 0.0]}]
    assert resolve_value(value, NAME, 0.25) == pytest.approx(0.25)
    assert resolve_value(value, "model.norm.weight", 0.25) == pytest.approx(0.75)


def test_a_single_filter_mapping_is_a_one_entry_list():
    assert resolve_value({"filter": "self_attn", "value": 0.2}, NAME, 0.0) == 0.2
    assert resolve_value({"filter": "mlp", "value": 0.2}, NAME, 0.0) is None


def test_lists_of_strings_or_booleans_pick_by_depth():
    assert resolve_value(["a", "b", "c"], NAME, 0.0) == "a"
    assert resolve_value(["a", "b", "c"], NAME, 0.6) == "b"  # int(0.6 * 2) = 1
    assert resolve_value(["a", "b", "c"], NAME, 1.0) == "c"
    assert resolve_value([True, False], NAME, 0.99) is True


def test_filters_match_substrings_only_as_mergekit_0_1_5():
    """A ``filter`` with glob characters is a literal substring: ``layers.1*mlp`` matches no
    real tensor name (mergekit 0.1.5 merges the same tensors)."""
    value = [{"filter": "layers.1*.mlp", "value": 1.0}, {"filter": "*", "value": 2.0}]
    assert resolve_value(value, "model.layers.12.mlp.up_proj.weight", 0.0) == 2.0
    assert resolve_value(value, "model.layers.1*.mlp.odd_name", 0.0) == 1.0
    assert resolve_value(value, NAME, 0.0) == 2.0
    assert resolve_value([{"filter": "layers.1", "value": 3.0}], "x.layers.12.y", 0.0) == 3.0


def test_filter_glob_is_an_explicit_glob():
    value = [{"filter_glob": "layers.1*.mlp", "value": 1.0}, {"value": 2.0}]
    assert resolve_value(value, "model.layers.12.mlp.up_proj.weight", 0.0) == 1.0
    assert resolve_value(value, "model.layers.1.mlp.up_proj.weight", 0.0) == 1.0
    assert resolve_value(value, "model.layers.2.mlp.up_proj.weight", 0.0) == 2.0
    assert resolve_value({"filter_glob": "lm_head", "value": 4.0}, "lm_head.weight", 0.0) == 4.0


def test_filter_and_filter_glob_together_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        resolve_value([{"filter": "mlp", "filter_glob": "mlp*", "value": 1.0}], NAME, 0.0)


@pytest.mark.parametrize(
    "bad", [[{"filter": "x"}], [{"filter": "x", "value": 1, "extra": 2}], {"a": 1}, [0.1, "x"]]
)
def test_unreadable_values_are_config_errors(bad):
    with pytest.raises(ConfigError):
        resolve_value(bad, NAME, 0.5)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("Float32") is torch.float32
    assert parse_dtype(None) is None
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("int4")


RECIPE = """\
merge_method: ties
base_model: ./base
models:
  - model: ./math
    parameters: {weight: 0.5, density: [0.2, 0.8]}
  - model: ./sql
    parameters:
      weight: [{filter: self_attn, value: 0.7}, {value: 0.3}]
parameters: {normalize: true}
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
"""


def test_recipe_parses_and_paths_resolve_against_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    (tmp_path / "recipe.yml").write_text(RECIPE)
    cfg = MergeConfig.from_yaml(tmp_path / "recipe.yml")
    assert cfg.merge_method == "ties"
    assert cfg.base_model == str(tmp_path / "base")
    assert [m.model for m in cfg.models] == [str(tmp_path / "math"), str(tmp_path / "sql")]
    assert cfg.models[0].parameters["density"] == [0.2, 0.8]
    assert cfg.tokenizer_source == "base"
    again = MergeConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("key", ["modules"])
def test_unsupported_mergekit_keys_say_so(key):
    with pytest.raises(ConfigError, match=f"'{key}' is not supported \\(yet\\)") as caught:
        MergeConfig.from_dict({"merge_method": "linear", key: "chatml"})
    assert "spelling" not in (caught.value.hint or "")


def test_tokenizer_block_and_chat_template_are_recipe_keys():
    cfg = MergeConfig.from_dict(
        {"merge_method": "linear", "tokenizer": {"source": "union"}, "chat_template": "chatml"}
    )
    assert cfg.tokenizer is not None and cfg.tokenizer.source == "union"
    assert cfg.chat_template == "chatml"


def test_lora_references_are_read_as_base_and_adapter(tmp_path):
    assert ModelReference.parse(f"{tmp_path}/base+{tmp_path}/adapter") == ModelReference(
        f"{tmp_path}/base", f"{tmp_path}/adapter"
    )
    folder = tmp_path / "odd+name"
    folder.mkdir()
    assert ModelReference.parse(str(folder)).lora is None  # an existing folder is a folder


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("merge_method: ties\nmodels: [", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("", "must be a mapping"),
        ("merge_method: linear\nmodelz: []\n", "modelz"),
        ("merge_method: linear\nmodels: [{model: a, weight: 1}]\n", "weight"),
        ("merge_method: linear\nmodels: []\ndtype: int3\n", "unknown dtype"),
        ("merge_method: linear\nslices: []\n", "slices"),
        ("models: []\n", "merge_method"),
    ],
)
def test_bad_recipes_are_one_line_config_errors(tmp_path, text, match):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        MergeConfig.from_yaml(path)
    assert "\n" not in info.value.message


def test_missing_folder_and_binary_recipes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        MergeConfig.from_yaml(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="folder"):
        MergeConfig.from_yaml(tmp_path)
    (tmp_path / "bin.yml").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError):
        MergeConfig.from_yaml(tmp_path / "bin.yml")


def test_gradient_reader_agrees_with_mergekit_floor_formula():
    values = [0.1, 0.9, 0.4, 0.6]
    for t in np.linspace(0, 1, 17):
        scaled = t * (len(values) - 1)
        i0 = math.floor(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        expected = (1 - frac) * values[i0] + frac * values[i1]
        assert resolve_value(values, NAME, float(t)) == pytest.approx(expected)


def test_a_model_folder_named_base_is_a_path_not_a_keyword(tmp_path):
    (tmp_path / "recipe.yml").write_text(
        "merge_method: ties\nbase_model: base\nmodels: [{model: union}]\ntokenizer_source: base\n"
    )
    cfg = MergeConfig.from_yaml(tmp_path / "recipe.yml")
    assert cfg.base_model == str(tmp_path / "base")
    assert cfg.models[0].model == str(tmp_path / "union")
    assert cfg.tokenizer_source == "base"  # here it is the keyword


PATHS_RECIPE = """\
merge_method: dam
base_model: base
models:
  - model: math
    dataset: {path: data/math.jsonl}
  - model: sql
    dataset: {path: data/sql.jsonl}
tokenizer_source: tok
training: {family: fam}
"""


def _make(root, *names):
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)


def _all_paths(cfg: MergeConfig) -> list[str]:
    return [
        cfg.base_model,
        *(m.model for m in cfg.models),
        *(m.dataset.path for m in cfg.models),
        cfg.tokenizer_source,
        cfg.training["family"],
    ]


def test_relative_paths_resolve_from_the_recipe_folder_first_then_the_current_one(
    tmp_path, monkeypatch
):
    recipes, cwd = tmp_path / "recipes", tmp_path / "work"
    _make(recipes, "base", "math", "sql", "tok", "fam", "data")
    _make(cwd, "base", "math", "elsewhere-only")  # decoys with the same names
    (recipes / "r.yml").write_text(PATHS_RECIPE.replace("model: sql", "model: elsewhere-only"))
    monkeypatch.chdir(cwd)
    cfg = MergeConfig.from_yaml(recipes / "r.yml")
    assert cfg.base_model == str(recipes / "base")  # the recipe's folder wins over the decoy
    assert cfg.models[0].model == str(recipes / "math")
    assert cfg.models[1].model == "elsewhere-only"  # only in the current folder: taken there
    assert cfg.models[0].dataset.path == str(recipes / "data/math.jsonl")  # missing: named there


def test_a_saved_recipe_names_the_same_folders_from_any_working_folder(tmp_path, monkeypatch):
    inputs, saved_in, elsewhere = tmp_path / "in", tmp_path / "runs" / "out", tmp_path / "x"
    _make(inputs, "base", "math", "sql", "tok", "fam", "data")
    _make(saved_in, ".")
    _make(elsewhere, "base", "math", "sql")  # decoys beside the working folder
    for name in ("math", "sql"):
        (inputs / "data" / f"{name}.jsonl").write_text("{}\n")
    (inputs / "r.yml").write_text(PATHS_RECIPE)
    monkeypatch.chdir(inputs)
    cfg = MergeConfig.from_yaml("r.yml")  # paths relative to the working folder, as users write
    expected = [str(inputs / p) for p in _all_paths(cfg)]
    assert all(not Path(p).is_absolute() for p in _all_paths(cfg))

    text = cfg.to_yaml(saved_in)
    assert text.startswith("# Paths are relative to the folder of this file")
    written = yaml.safe_load(text)
    assert written["base_model"] == "../../in/base"
    assert written["models"][1]["dataset"] == {"path": "../../in/data/sql.jsonl"}
    assert written["tokenizer_source"] == "../../in/tok"
    (saved_in / "dammerge_config.yml").write_text(text)

    monkeypatch.chdir(elsewhere)
    again = MergeConfig.from_yaml(saved_in / "dammerge_config.yml")
    assert [str(Path(p).resolve()) for p in _all_paths(again)] == expected
    # and nothing but the paths' spelling changed
    assert again.map_paths(lambda p: str(Path(p).resolve())) == cfg.map_paths(
        lambda p: str(inputs / p)
    )


def test_saved_keywords_stay_keywords_and_absolute_paths_work_too(tmp_path):
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": str(tmp_path / "a")}],
            "tokenizer_source": "base",
        }
    )
    written = yaml.safe_load(cfg.to_yaml(tmp_path / "out"))
    assert written["tokenizer_source"] == "base"
    assert written["models"] == [{"model": "../a", "parameters": {}}]
    assert yaml.safe_load(cfg.to_yaml()) == {  # without a folder: as the recipe holds them
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / "a"), "parameters": {}}],
        "parameters": {},
        "tokenizer_source": "base",
    }

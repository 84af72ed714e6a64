"""``slices`` / ``layer_range`` and ``passthrough``, checked against references written here.

A frankenmerge's output layer ``j`` must hold exactly the tensors of the input layer it names,
renamed; embeddings come from the first slice's model and the final norm and ``lm_head`` from
the last slice's; ``config.json`` says how many layers there are. Gradients restart in every
slice. Every output loads in transformers. Bad slices are one-line errors before any compute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dammerge
from dammerge.config import MergeConfig, load_config
from dammerge.errors import ConfigError
from dammerge.plan import build_plan, describe, restacked_config
from dammerge.registry import load_recipe


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def layer(name: str, index: int) -> str:
    """``model.layers.K.rest`` renamed to layer ``index``."""
    parts = name.split(".")
    return ".".join([*parts[:2], str(index), *parts[3:]])


def layer_tensors(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    return {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}


def merge(recipe: dict[str, Any], out: Path) -> Path:
    return dammerge.merge(recipe, out, progress=False)


def test_frankenmerge_stacks_the_named_layers(llama_family, tmp_path):
    _, (a, b, _) = llama_family
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
            {"sources": [{"model": str(a), "layer_range": [1, 3]}]},
        ],
    }
    out = merge(recipe, tmp_path / "out")
    merged, ta, tb = tensors(out), tensors(a), tensors(b)
    origins = [(ta, 0), (ta, 1), (tb, 1), (tb, 2), (ta, 1), (ta, 2)]
    per_layer = len(layer_tensors(ta, 0))
    assert len(merged) == len(ta) - 3 * per_layer + len(origins) * per_layer
    for j, (source, index) in enumerate(origins):
        expected = layer_tensors(source, index)
        got = layer_tensors(merged, j)
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(got[name], value), f"layer {j} {name}"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], ta[name])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(origins)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == len(origins)


def test_embeddings_from_the_first_slice_head_from_the_last(llama_family, tmp_path):
    _, (a, b, _) = llama_family
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(b), "layer_range": [2, 3]}]},
        ],
    }
    merged, ta, tb = tensors(merge(recipe, tmp_path / "out")), tensors(a), tensors(b)
    assert torch.equal(merged["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], tb["model.norm.weight"])
    assert torch.equal(merged["lm_head.weight"], tb["lm_head.weight"])


def test_passthrough_scale_multiplies_and_a_single_model_is_copied(llama_family, tmp_path):
    _, (a, _, _) = llama_family
    scaled = {
        "merge_method": "passthrough",
        "models": [
            {"model": str(a), "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}]}}
        ],
    }
    merged, ta = tensors(merge(scaled, tmp_path / "scaled")), tensors(a)
    assert sorted(merged) == sorted(ta)
    for name, value in ta.items():
        expected = torch.zeros_like(value) if "o_proj" in name else value
        assert torch.equal(merged[name], expected), name
    AutoModelForCausalLM.from_pretrained(tmp_path / "scaled")


def test_gradients_restart_in_every_slice(llama_family, tmp_path):
    """A linear merge of a model with itself, weighted by a gradient, against the hand-made
    weights: t = i / (length - 1) in each slice, t = 1 for a one-layer slice."""
    _, (a, b, _) = llama_family

    def sources(start: int, end: int) -> list[dict[str, Any]]:
        return [
            {"model": str(a), "layer_range": [start, end]},
            {"model": str(b), "layer_range": [start, end], "parameters": {"weight": 1.0}},
        ]

    recipe = {
        "merge_method": "linear",
        "slices": [
            {"sources": sources(0, 3)},
            {"sources": sources(1, 2)},
            {"sources": sources(0, 2)},
        ],
        "parameters": {"weight": [0.0, 4.0], "normalize": True},
    }
    out = merge(recipe, tmp_path / "out")
    merged, ta, tb = tensors(out), tensors(a), tensors(b)
    # (output layer, input layer, t)
    layout = [(0, 0, 0.0), (1, 1, 0.5), (2, 2, 1.0), (3, 1, 1.0), (4, 0, 0.0), (5, 1, 1.0)]
    for j, index, t in layout:
        w = 4.0 * t
        for name, value in layer_tensors(ta, index).items():
            expected = (w * value + layer_tensors(tb, index)[name]) / (w + 1.0)
            torch.testing.assert_close(layer_tensors(merged, j)[name], expected)
    # outside the blocks: t = 0, so only b counts
    torch.testing.assert_close(merged["lm_head.weight"], tb["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    AutoModelForCausalLM.from_pretrained(out)


def test_sliced_slerp_loads_and_plans_the_base_from_the_sources(llama_family, tmp_path):
    base, (a, _, _) = llama_family
    recipe = {
        "merge_method": "slerp",
        "base_model": str(base),
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 3]},
                    {"model": str(a), "layer_range": [0, 3]},
                ]
            }
        ],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
    }
    plan = build_plan(load_config(recipe))
    assert [ck.path for ck in plan.participants] == [a.resolve()]
    q = [t for t in plan.tensors if t.name.endswith("q_proj.weight")]
    assert [t.params["t"] for t in q] == [0.0, 0.5, 1.0]
    assert all(t.base_source is not None and t.base_source.model == base.resolve() for t in q)
    assert any(line.startswith("slice       layers 0-2") for line in describe(plan))
    AutoModelForCausalLM.from_pretrained(merge(recipe, tmp_path / "out"))


def test_layer_types_follow_their_layers():
    config = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "hidden_size": 8}
    other = {"num_hidden_layers": 2, "layer_types": ["x", "y"]}
    out = restacked_config(config, ("num_hidden_layers",), [(config, 2), (other, 0), (config, 2)])
    assert out["num_hidden_layers"] == 3 and out["layer_types"] == ["c", "x", "c"]
    assert config["layer_types"] == ["a", "b", "c"]  # the input is not modified
    nested = {"text_config": {"num_hidden_layers": 2, "layer_types": ["a", "b"]}}
    out = restacked_config(nested, ("num_hidden_layers",), [(nested, 1)] * 4)
    assert out["text_config"] == {"num_hidden_layers": 4, "layer_types": ["b"] * 4}


def test_qwen2_frankenmerge_writes_its_layer_types(tiny_family, tmp_path):
    _, (a, b) = tiny_family("qwen2")
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [0, 1]}]},
        ],
    }
    out = merge(recipe, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    types = [json.loads((m / "config.json").read_text())["layer_types"] for m in (a, b)]
    assert config["layer_types"] == [types[0][0], types[0][1], types[1][0]]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def _slices(*ranges: tuple[str, int, int]) -> list[dict[str, Any]]:
    return [{"sources": [{"model": m, "layer_range": [s, e]} for m, s, e in ranges]}]


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        (
            {"merge_method": "passthrough", "slices": _slices(("A", 2, 5))},
            r"slice 0: layer_range \[2, 5\] goes past .*'s 3 layers",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "B",
                "slices": _slices(("B", 0, 3), ("A", 0, 2)),
                "parameters": {"t": 0.5},
            },
            "must cover the same number of layers",
        ),
        (
            {"merge_method": "passthrough", "slices": _slices(("A", 0, 1), ("B", 0, 1))},
            "slice 0: passthrough takes at most 1 model",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "B",
                "slices": _slices(("A", 0, 3), ("C", 0, 3)),
                "parameters": {"t": 0.5},
            },
            "its base model .* is not among its sources",
        ),
        (
            {"merge_method": "linear", "slices": _slices(("A", 0, 3), ("A", 0, 3))},
            "lists the same model twice",
        ),
        (
            {"merge_method": "passthrough", "slices": _slices(("A", 1, 1))},
            r"layer_range \[1, 1\] must be \[start, end\)",
        ),
        (
            {"merge_method": "passthrough", "slices": _slices(("A", 0, 1)), "models": "A"},
            "either 'models' or 'slices'",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": "A", "layer_range": [0, 1]}], "parameters": {"scal": 0}}
                ],
            },
            "unknown parameter 'scal'.*did you mean 'scale'",
        ),
    ],
)
def test_bad_slices_are_one_line_errors_before_compute(llama_family, recipe, match):
    base, (a, _, c) = llama_family
    paths = {"A": str(a), "B": str(base), "C": str(c)}
    if recipe.get("models") == "A":
        recipe = {**recipe, "models": [{"model": paths["A"]}]}
    if "base_model" in recipe:
        recipe = {**recipe, "base_model": paths[recipe["base_model"]]}
    for out_slice in recipe["slices"]:
        for source in out_slice["sources"]:
            source["model"] = paths[source["model"]]
    with pytest.raises(ConfigError, match=match) as caught:
        build_plan(MergeConfig.from_dict(recipe))
    assert "\n" not in caught.value.message


def test_recipe_with_slices_round_trips_through_yaml(llama_family):
    _, (a, _, _) = llama_family
    cfg = MergeConfig.from_dict({"merge_method": "passthrough", "slices": _slices((str(a), 0, 2))})
    text = cfg.to_yaml()
    assert "models:" not in text  # mergekit reads exactly one of models and slices
    assert MergeConfig.from_dict(yaml.safe_load(text)) == cfg


def test_learned_methods_refuse_slices(llama_family):
    _, (a, b, _) = llama_family
    recipe = {
        "merge_method": "dam",
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 3]},
                    {"model": str(b), "layer_range": [0, 3]},
                ]
            }
        ],
    }
    with pytest.raises(ConfigError, match="'slices' are for data-free methods"):
        load_recipe(recipe)

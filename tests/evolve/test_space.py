"""The genome -> recipe mapping: every tensor gets its own gene's value, via plain recipes."""

from __future__ import annotations

import numpy as np
import pytest

from dammerge.config import MergeConfig
from dammerge.errors import ConfigError
from dammerge.evolve.settings import base_method, read_settings, searched_parameters
from dammerge.evolve.space import SearchSpace, layer_ranges
from dammerge.plan import build_plan


def _space(llama_family, **training) -> SearchSpace:
    base, variants = llama_family
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "evolve",
            "base_model": str(base),
            "models": [{"model": str(v)} for v in variants[:2]],
            "parameters": {"method": "ties", "normalize": True},
            "training": training,
        }
    )
    settings = read_settings(cfg)
    method = base_method(cfg)
    return SearchSpace(cfg, method, searched_parameters(settings, method), settings, 3)


def _expected_gene(space: SearchSpace, param: str, model: int, name: str, layer: int | None):
    """The gene a tensor must follow, worked out from its name and layer alone."""
    if layer is None:  # embeddings, final norm and lm_head all resolve at depth 0 (mergekit)
        layer = 0
    module = next((m for m in space.settings.module_groups if m in name), None)
    ranges = layer_ranges(space.num_layers, space.layer_groups)
    group = next(i for i, (lo, hi) in enumerate(ranges) if lo <= layer <= hi)
    matches = [
        i
        for i, g in enumerate(space.genes)
        if g.param == param
        and g.model == model
        and g.module == module
        and (g.first_layer, g.last_layer) == ranges[group]
    ]
    assert len(matches) == 1
    return matches[0]


def test_layer_ranges_split_evenly():
    assert layer_ranges(3, 2) == [(0, 1), (2, 2)]
    assert layer_ranges(8, 4) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert layer_ranges(5, 1) == [(0, 4)]


def test_every_tensor_resolves_to_its_gene(llama_family):
    space = _space(llama_family, layer_groups=2, module_groups=["self_attn", "mlp"])
    # 2 params x 2 models x 3 module groups (self_attn, mlp, rest) x 2 layer groups
    assert space.dims == 24
    x = np.random.default_rng(0).uniform(size=space.dims)
    values = space.values(x)
    plan = build_plan(space.to_config(x))
    for tensor in plan.tensors:
        for model in range(2):
            for param in ("weight", "density"):
                gene = _expected_gene(space, param, model, tensor.name, tensor.info.layer)
                resolved = tensor.model_params[model][param]
                assert resolved == pytest.approx(values[gene], abs=1e-12), tensor.name


def test_values_respect_bounds_and_rounding(llama_family):
    space = _space(llama_family, layer_groups=1, bounds={"density": [0.2, 0.6]})
    values = space.values(np.array([0.0, 1.0, 0.5, 0.123456789]))  # weight a, b; density a, b
    assert values == [0.0, 1.0, 0.4, round(0.2 + 0.4 * 0.123456789, 6)]
    recipe = space.to_config(np.array([0.0, 1.0, 0.5, 0.5]))
    assert recipe.models[0].parameters == {"weight": 0.0, "density": 0.4}  # scalars when global
    assert recipe.merge_method == "ties" and recipe.parameters == {"normalize": True}


def test_start_point_is_model_soups_like(llama_family):
    space = _space(llama_family, layer_groups=1)
    assert space.values(space.x0()) == [0.5, 0.5, 0.55, 0.55]


def test_too_many_layer_groups(llama_family):
    with pytest.raises(ConfigError, match="layer_groups is 4 but the models have 3 layers"):
        _space(llama_family, layer_groups=4)


def test_filter_that_matches_nothing(llama_family):
    space = _space(llama_family, layer_groups=1, module_groups=["attention"])
    with pytest.raises(ConfigError, match="'attention' matches no tensor"):
        space.check_filters(["model.layers.0.self_attn.q_proj.weight"])


def test_sce_searches_its_selection_fraction_by_default(llama_family):
    """A method whose only tunable knob is global (sce's select_topk) is searched per layer
    group, and every candidate recipe is a valid sce plan."""
    base, variants = llama_family
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "evolve",
            "base_model": str(base),
            "models": [{"model": str(v)} for v in variants[:2]],
            "parameters": {"method": "sce"},
            "training": {"layer_groups": 2},
        }
    )
    settings, method = read_settings(cfg), base_method(cfg)
    assert searched_parameters(settings, method) == ["select_topk"]
    space = SearchSpace(cfg, method, ["select_topk"], settings, 3)
    plan = build_plan(space.to_config(np.full(space.dims, 0.5)))
    assert {t.params["select_topk"] for t in plan.tensors} == {0.55}

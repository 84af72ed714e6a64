"""From recipe to plan: per-tensor parameters (gradients over depth, filters), and every input
problem found before anything is written."""

from __future__ import annotations

import pytest
import torch

import dammerge
from dammerge.config import MergeConfig
from dammerge.errors import CheckpointError, ConfigError
from dammerge.methods import METHODS
from dammerge.plan import UnusedParameterWarning, build_plan, describe

LAYERS = 3  # the tiny Llama of the llama_family fixture


def plan_for(recipe: dict):
    return build_plan(MergeConfig.from_dict(recipe))


def expected_depth(name: str) -> float:
    """The depth rule written out: block l of L at l/(L−1); every tensor outside the blocks
    (embeddings, final norm, lm_head) at 0, where mergekit reads them (its plan resolves pre-
    and post-block weights with t = 0)."""
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) / (LAYERS - 1)
    return 0.0


def test_gradients_resolve_per_layer(llama_family):
    base, (a, b, _) = llama_family
    plan = plan_for(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": str(a), "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
                {"model": str(b), "parameters": {"weight": [1.0, 0.0, 1.0]}},
            ],
            "parameters": {"lambda": [0.5, 1.5]},
        }
    )
    names = {t.name for t in plan.tensors}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
    for t in plan.tensors:
        depth = expected_depth(t.name)
        assert t.depth == pytest.approx(depth), t.name
        assert t.model_params[0]["density"] == pytest.approx(0.2 + 0.6 * depth)
        assert t.model_params[1]["density"] == 1.0  # the method's default
        assert t.model_params[1]["weight"] == pytest.approx(1.0 - 2 * min(depth, 1 - depth))
        assert t.params["lambda"] == pytest.approx(0.5 + depth)
        assert t.params["normalize"] is True
    depths = {t.name: t.depth for t in plan.tensors}
    assert depths["model.embed_tokens.weight"] == 0.0
    assert depths["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert depths["model.norm.weight"] == depths["lm_head.weight"] == 0.0


def test_filters_resolve_per_tensor_and_global_parameters_are_defaults(llama_family):
    base, (a, b, _) = llama_family
    plan = plan_for(
        {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "models": [
                {
                    "model": str(a),
                    "parameters": {
                        "weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.3}]
                    },
                },
                {
                    "model": str(b),
                    "parameters": {
                        "weight": 1.0,
                        "density": [{"filter": "mlp", "value": [0.1, 0.9]}],
                    },
                },
            ],
            "parameters": {"density": 0.5},
        }
    )
    for t in plan.tensors:
        first, second = t.model_params
        assert first["weight"] == (0.7 if "self_attn" in t.name else 0.3)
        assert first["density"] == 0.5  # from the global parameters
        if ".mlp." in t.name:
            assert second["density"] == pytest.approx(0.1 + 0.8 * expected_depth(t.name))
        else:  # the filter list does not match: fall back to the global value
            assert second["density"] == 0.5


def test_slerp_t_gradient_and_filters(llama_family):
    base, (a, _, _) = llama_family
    plan = plan_for(
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(a)}],  # the base may be listed too
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
        }
    )
    assert [ck.path for ck in plan.participants] == [a.resolve()]
    for t in plan.tensors:
        want = expected_depth(t.name) if "self_attn" in t.name else 0.5
        assert t.params["t"] == pytest.approx(want)


def test_plan_describes_itself(llama_family):
    base, variants = llama_family
    plan = plan_for(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(v), "parameters": {"weight": 0.3}} for v in variants],
        }
    )
    text = "\n".join(describe(plan))
    assert "task_arithmetic" in text and "layers      3" in text
    assert f"tensors     {len(plan.tensors)}" in text


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ({"merge_method": "frankenmerge"}, "unknown merge_method"),
        ({"merge_method": "linear", "models": []}, "lists no models"),
        ({"merge_method": "ties", "models": "A"}, "needs a base_model"),
        (
            {"merge_method": "linear", "models": "A", "parameters": {"densty": 0.5}},
            "unknown parameter 'densty'",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "B",
                "models": "A",
                "model_parameters": {"gama": 0.1},
            },
            "unknown parameter 'gama'.*did you mean 'gamma'",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "B",
                "models": "A",
                "model_parameters": {"lambda": 0.5},
            },
            "'lambda' is a global parameter of ties",
        ),
        (
            {"merge_method": "slerp", "base_model": "B", "models": "AA", "parameters": {"t": 0.5}},
            "at most 1",
        ),
        ({"merge_method": "model_stock", "base_model": "B", "models": "A"}, "at least 2"),
        ({"merge_method": "linear", "models": "A", "no_weight": True}, "needs parameter 'weight'"),
        ({"merge_method": "slerp", "base_model": "B", "models": "A"}, "global parameter 't'"),
    ],
)
def test_recipe_problems_are_config_errors(llama_family, recipe, match):
    base, (a, b, _) = llama_family
    paths = {"A": str(a), "B": str(base)}
    models = recipe.pop("models", [])
    model_parameters = recipe.pop("model_parameters", {})
    no_weight = recipe.pop("no_weight", False)
    takes_weight = recipe["merge_method"] not in ("slerp", "model_stock") and not no_weight
    recipe["models"] = (
        [
            {
                "model": paths.get(m, str(b)),
                "parameters": {"weight": 1.0, **model_parameters} if takes_weight else {},
            }
            for m in models
        ]
        if isinstance(models, str)
        else models
    )
    if "base_model" in recipe:
        recipe["base_model"] = paths[recipe["base_model"]]
    with pytest.raises(ConfigError, match=match):
        plan_for(recipe)


@pytest.mark.parametrize(
    ("method", "where", "key"),
    [
        ("slerp", "model", "weight"),
        ("model_stock", "model", "weight"),
        ("task_arithmetic", "model", "density"),
        ("linear", "global", "gamma"),
    ],
)
def test_a_parameter_another_method_takes_is_ignored_with_a_warning(
    llama_family, method, where, key
):
    """mergekit's own tests pass such parameters and mergekit ignores them; so does dammerge,
    saying so once."""
    base, variants = llama_family
    takes_weight = method in ("linear", "task_arithmetic")
    models = variants[:2] if method == "model_stock" else variants[:1]
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {
                "model": str(m),
                "parameters": {
                    **({"weight": 1.0} if takes_weight else {}),
                    **({key: 0.5} if where == "model" else {}),
                },
            }
            for m in models
        ],
        "parameters": {
            **({"t": 0.5} if method == "slerp" else {}),
            **({key: 0.5} if where == "global" else {}),
        },
    }
    with pytest.warns(UnusedParameterWarning, match=f"{method} does not use parameter '{key}'"):
        plan = plan_for(recipe)
    assert all(
        key not in t.params and all(key not in p for p in t.model_params) for t in plan.tensors
    )


@pytest.mark.parametrize(
    ("method", "model_params", "global_params", "match"),
    [
        ("della", {"density": 0.1, "epsilon": 0.2}, {}, "leaves \\[0, 1\\]"),
        ("della", {"density": 0.5, "epsilon": -0.1}, {}, "'epsilon' is -0.1"),
        ("ties", {"density": 1.5}, {}, "'density' is 1.5"),
        ("breadcrumbs", {"density": 0.5, "gamma": [0.0, -0.2]}, {}, r"'gamma' is -0\.1"),
        ("dare_ties", {"density": 0.5}, {"rescale_mode": "l2"}, "'rescale_mode' is 'l2'"),
        ("task_arithmetic", {"weight": "half"}, {}, "'weight' is 'half'"),
        ("task_arithmetic", {}, {"lambda": True}, "'lambda' is True"),
        ("ties", {}, {"normalize": "no"}, "'normalize' is 'no'.*true or false"),
    ],
)
def test_parameter_values_are_checked_before_compute(
    llama_family, tmp_path, method, model_params, global_params, match
):
    """A value the kernel would reject fails the dry run, before anything is read or written."""
    base, (a, b, _) = llama_family
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": 0.5, **model_params}} for m in (a, b)
        ],
        "parameters": global_params,
    }
    with pytest.raises(ConfigError, match=match):
        dammerge.merge(recipe, tmp_path / "out", dry_run=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_lora_reference_to_a_missing_adapter_is_refused_before_compute(llama_family, tmp_path):
    base, (a, _, _) = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": f"{a}+{tmp_path}/adapter", "parameters": {"weight": 1.0}},
            {"model": str(base), "parameters": {"weight": 1.0}},
        ],
    }
    with pytest.raises(CheckpointError, match="LoRA adapter folder not found"):
        dammerge.merge(recipe, tmp_path / "out", dry_run=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_true_typo_stays_an_error_with_a_suggestion(llama_family):
    _, (a, _, _) = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"wieght": 1.0}}],
    }
    with pytest.raises(ConfigError, match=r"unknown parameter 'wieght'.*did you mean 'weight'"):
        plan_for(recipe)


def test_tokenizer_source_without_tokenizer_is_refused(llama_family, tmp_path):
    _, (a, _, _) = llama_family
    with pytest.raises(ConfigError, match="no tokenizer"):
        plan_for(
            {
                "merge_method": "linear",
                "models": [{"model": str(a), "parameters": {"weight": 1}}],
                "tokenizer_source": str(tmp_path),
            }
        )


def test_shape_mismatches_are_all_listed(llama_family, tmp_path, derive):
    base, (a, _, _) = llama_family

    def reshape(state):
        state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
        state["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(32, 33)
        return state

    odd = derive(a, tmp_path / "odd", reshape)
    with pytest.raises(CheckpointError) as info:
        plan_for(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [{"model": str(odd), "parameters": {"weight": 1.0}}],
            }
        )
    message = info.value.message
    assert "model.layers.0.mlp.up_proj.weight: base [64, 32] vs odd [65, 32]" in message
    assert "model.layers.2.self_attn.q_proj.weight: base [32, 32] vs odd [32, 33]" in message
    assert "\n" not in message and info.value.hint


def test_missing_and_extra_tensors_are_listed(llama_family, tmp_path, derive):
    base, (a, _, _) = llama_family

    def edit(state):
        del state["model.layers.1.mlp.down_proj.weight"]
        state["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2)
        return state

    odd = derive(a, tmp_path / "odd", edit)
    with pytest.raises(CheckpointError) as info:
        plan_for(
            {
                "merge_method": "linear",
                "base_model": str(base),
                "models": [{"model": str(odd), "parameters": {"weight": 1.0}}],
            }
        )
    assert "odd lacks model.layers.1.mlp.down_proj.weight" in info.value.message
    assert "odd has extra tensor model.layers.1.mlp.extra.weight" in info.value.message


def test_long_mismatch_lists_are_capped(llama_family, tmp_path, derive):
    base, (a, _, _) = llama_family
    odd = derive(a, tmp_path / "odd", lambda s: {k: v[..., :-1].contiguous() for k, v in s.items()})
    with pytest.raises(CheckpointError, match=r"and \d+ more"):
        plan_for(
            {
                "merge_method": "linear",
                "base_model": str(base),
                "models": [{"model": str(odd), "parameters": {"weight": 1.0}}],
            }
        )


def test_integer_buffers_keep_their_dtype_under_out_dtype(llama_family, tmp_path, derive):
    base, (a, _, _) = llama_family

    def add_buffer(state):
        state["model.layers.0.self_attn.position_ids"] = torch.arange(8)
        return state

    b2, a2 = derive(base, tmp_path / "b", add_buffer), derive(a, tmp_path / "a", add_buffer)
    plan = plan_for(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(b2),
            "models": [{"model": str(a2), "parameters": {"weight": 1.0}}],
            "out_dtype": "bfloat16",
        }
    )
    buffer = next(t for t in plan.tensors if t.name.endswith("position_ids"))
    assert buffer.copy_from_reference
    assert plan.output_dtype(buffer) is torch.int64
    weight = next(t for t in plan.tensors if t.name.endswith("q_proj.weight"))
    assert plan.output_dtype(weight) is torch.bfloat16


@pytest.mark.parametrize(
    ("method", "models", "global_params", "match"),
    [
        ("nuslerp", 2, {"nuslerp_flatten": "no"}, "'nuslerp_flatten' is 'no'.*true or false"),
        ("multislerp", 2, {"eps": 0.0}, "'eps' is 0.0.*> 0"),
        ("karcher", 2, {"max_iter": [1, 4]}, "'max_iter' is 2.5.*a whole number >= 0"),
        ("karcher", 2, {"tol": -1e-5}, "'tol' is -1e-05"),
        ("nearswap", 1, {"t": -0.5}, "'t' is -0.5.*>= 0"),
        ("ram", 2, {"epsilon": -1.0}, "'epsilon' is -1.0"),
        ("ramplus_tl", 2, {"epsilon": 0.0}, "'epsilon' is 0.0.*> 0"),
        ("ramplus_tl", 2, {"alpha": "big"}, "'alpha' is 'big'"),
    ],
)
def test_method_value_ranges_are_checked_before_compute(
    llama_family, tmp_path, method, models, global_params, match
):
    """Each method's own ranges (its catalogue row) fail the dry run too; a gradient is
    checked at every depth it resolves to."""
    base, variants = llama_family
    own = {"weight": 0.5} if "weight" in METHODS[method].model_params else {}
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": own} for m in variants[:models]],
        "parameters": global_params,
    }
    with pytest.raises(ConfigError, match=match):
        dammerge.merge(recipe, tmp_path / "out", dry_run=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_an_optional_base_is_used_when_given(llama_family):
    """nuslerp and multislerp work on task vectors with a base_model, listed among the models
    or not, and on the models themselves without one."""
    base, (a, b, _) = llama_family
    models = [{"model": str(m), "parameters": {"weight": 0.5}} for m in (base, a, b)]
    with_base = plan_for({"merge_method": "nuslerp", "base_model": str(base), "models": models})
    assert with_base.base is not None and with_base.base.path == base.resolve()
    assert [ck.path for ck in with_base.participants] == [a.resolve(), b.resolve()]
    assert all(t.base_source is not None for t in with_base.tensors if not t.copy_from_reference)
    without = plan_for({"merge_method": "multislerp", "models": models[1:]})
    assert without.base is None
    assert all(t.base_source is None for t in without.tensors)


def test_a_base_joins_the_models_of_karcher_as_in_mergekit(llama_family):
    """mergekit 0.1.5 merges a base_model not listed among the models as the last model of a
    method that takes no base; listed, it is merged once."""
    base, (a, b, _) = llama_family
    recipe = {"merge_method": "karcher", "base_model": str(base), "models": [{"model": str(a)}]}
    plan = plan_for({**recipe, "models": [{"model": str(a)}, {"model": str(b)}]})
    assert plan.base is None
    assert [ck.path for ck in plan.participants] == [a.resolve(), b.resolve(), base.resolve()]
    listed = plan_for({**recipe, "models": [{"model": str(base)}, {"model": str(a)}]})
    assert [ck.path for ck in listed.participants] == [base.resolve(), a.resolve()]

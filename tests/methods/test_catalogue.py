"""The catalogue: every record's parameters and defaults as recipes see them, its paper, and
rows composing kernels into methods."""

from __future__ import annotations

import numpy as np
import torch

from dammerge.methods import METHODS, REQUIRED, MergeInputs
from dammerge.methods.catalogue import TRIM, TaskVectorRow, task_vector_method

from . import reference as ref
from .harness import random_family, tensor

R = REQUIRED
TASK_VECTOR = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
DROPS = {"normalize": False, "lambda": 1.0, "rescale": True, "rescale_mode": "l1"}
EXPECTED = {  # name: (per-model parameters, global parameters), defaults in listing order
    "linear": ({"weight": R}, {"normalize": True}),
    "task_arithmetic": ({"weight": R}, TASK_VECTOR),
    "ties": ({"weight": R, "density": 1.0}, {**TASK_VECTOR, "normalize": True}),
    "dare_linear": ({"weight": R, "density": 1.0}, {**DROPS, "int8_mask": False}),
    "dare_ties": ({"weight": R, "density": 1.0}, {**DROPS, "int8_mask": False}),
    "breadcrumbs": ({"weight": R, "density": 1.0, "gamma": 0.01}, TASK_VECTOR),
    "breadcrumbs_ties": ({"weight": R, "density": 1.0, "gamma": 0.01}, TASK_VECTOR),
    "della": (
        {"weight": R, "density": 1.0, "epsilon": 0.15},
        {**DROPS, "normalize": True, "int8_mask": False},
    ),
    "della_linear": ({"weight": R, "density": 1.0, "epsilon": 0.15}, {**DROPS, "int8_mask": False}),
    "sce": ({}, {"normalize": True, "lambda": 1.0, "select_topk": 1.0, "int8_mask": False}),
    "ram": ({}, {"epsilon": 1e-5}),
    "ramplus_tl": ({}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    "slerp": ({}, {"t": R}),
    "nuslerp": ({"weight": R}, {"nuslerp_flatten": True, "nuslerp_row_wise": False}),
    "multislerp": ({"weight": R}, {"normalize_weights": True, "eps": 1e-8}),
    "karcher": ({}, {"max_iter": 10, "tol": 1e-5}),
    "model_stock": ({}, {"filter_wise": False}),
    "nearswap": ({}, {"t": R}),
    "arcee_fusion": ({}, {}),
    "passthrough": ({"scale": 1.0}, {}),
}
WITHOUT_BASE = ("linear", "passthrough", "nuslerp", "multislerp", "karcher")
OPTIONAL_BASE = ("nuslerp", "multislerp")
MODEL_COUNTS = {  # (min, max) besides a base handed over as `base`
    "slerp": (1, 1),
    "model_stock": (2, None),
    "passthrough": (1, 1),
    "nuslerp": (2, 2),
    "nearswap": (1, 1),
    "arcee_fusion": (1, 1),
}
# parameter: (a value in range, a value out of range) for every restricted parameter
FLAGS = {"int8_mask": (False, "no")}
RANGES = {
    "linear": {"normalize": (False, 0)},
    "task_arithmetic": {"normalize": (True, 1), "rescale": (True, "yes"), **FLAGS},
    **{
        name: {"normalize": (False, None), "rescale": (True, 1.0), **FLAGS}
        for name in (
            "ties",
            "dare_linear",
            "dare_ties",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della",
            "della_linear",
        )
    },
    "sce": {"normalize": (True, "true"), **FLAGS},
    "model_stock": {"filter_wise": (True, "rows")},
    "ram": {"epsilon": (0.0, -1e-3)},
    "ramplus_tl": {"r": (0.0, -0.1), "alpha": (0.0, -0.2), "epsilon": (1e-9, 0.0)},
    "nuslerp": {"nuslerp_flatten": (False, 1), "nuslerp_row_wise": (True, "yes")},
    "multislerp": {"normalize_weights": (False, 0.0), "eps": (1e-12, 0.0)},
    "karcher": {"max_iter": (0, 2.5), "tol": (0.0, -1e-5)},
    "nearswap": {"t": (0.0, -0.1)},
}


def test_every_method_has_its_parameters_defaults_and_paper():
    assert list(METHODS) == list(EXPECTED)
    for name, (model_params, global_params) in EXPECTED.items():
        record = METHODS[name]
        assert record.name == name and record.summary
        assert record.paper.startswith("https://"), name
        assert record.model_params == model_params, name
        assert list(record.global_params.items()) == list(global_params.items()), name
        assert record.requires_base == (name not in WITHOUT_BASE), name
        assert record.optional_base == (name in OPTIONAL_BASE), name
        assert record.base_joins_models == (name == "karcher"), name
        assert record.stochastic == name.startswith(("dare", "della")), name
        counts = (record.min_models, record.max_models)
        assert counts == MODEL_COUNTS.get(name, (1, None)), name


def test_restricted_parameters_admit_their_range_only():
    for name, method in METHODS.items():
        assert set(method.ranges) == set(RANGES.get(name, {})), name
        assert set(method.ranges) <= set(method.model_params) | set(method.global_params), name
    for name, checks in RANGES.items():
        for key, (inside, outside) in checks.items():
            allowed = METHODS[name].ranges[key]
            assert allowed.admits(inside), (name, key, inside)
            assert not allowed.admits(outside), (name, key, outside)


def test_passthrough_copies_or_scales_its_one_model():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))

    def run(scale: float) -> torch.Tensor:
        inputs = MergeInputs("w", [x], None, [{"scale": scale}], {})
        return METHODS["passthrough"].run(inputs)

    assert run(1.0) is x
    assert torch.equal(run(0.0), torch.zeros_like(x))
    assert torch.equal(run(-0.5), x * -0.5)


def test_a_new_row_composes_existing_columns():
    """Magnitude trim without a sign election: a method that is only a row."""
    record = task_vector_method(
        TaskVectorRow("trimmed_sum", "trim, then sum", "https://example.org", sparsify=TRIM)
    )
    assert record.model_params == {"weight": REQUIRED, "density": 1.0}
    base, xs = random_family((6, 7), 3, seed=91)
    weights, densities = [0.5, 1.0, -0.3], [0.4, 0.7, 0.2]
    inputs = MergeInputs(
        name="test.weight",
        tensors=[tensor(x) for x in xs],
        base=tensor(base),
        model_params=[{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
        params={"normalize": False, "lambda": 0.8, "rescale": False, "int8_mask": False},
    )
    got = record.run(inputs)
    deltas = [ref.trim(x - base, d) for x, d in zip(xs, densities, strict=True)]
    expected = ref.combine(base, deltas, weights, consensus=False, normalize=False, lambda_=0.8)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert got.dtype == torch.float64

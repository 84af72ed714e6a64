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
    "slerp": ({}, {"t": R}),
    "model_stock": ({}, {"filter_wise": False}),
    "passthrough": ({"scale": 1.0}, {}),
}
WITHOUT_BASE = ("linear", "passthrough")


def test_every_method_has_its_parameters_defaults_and_paper():
    assert list(METHODS) == list(EXPECTED)
    for name, (model_params, global_params) in EXPECTED.items():
        record = METHODS[name]
        assert record.name == name and record.summary
        assert record.paper.startswith("https://"), name
        assert record.model_params == model_params, name
        assert list(record.global_params.items()) == list(global_params.items()), name
        assert record.requires_base == (name not in WITHOUT_BASE), name
        assert record.stochastic == name.startswith(("dare", "della")), name
    assert (METHODS["slerp"].min_models, METHODS["slerp"].max_models) == (1, 1)
    assert (METHODS["model_stock"].min_models, METHODS["model_stock"].max_models) == (2, None)
    assert (METHODS["passthrough"].min_models, METHODS["passthrough"].max_models) == (1, 1)


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

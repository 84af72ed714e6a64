"""linear (Model Soups): Σ wᵢWᵢ / Σ wᵢ, against a numpy loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dammerge.methods.linear import linear

from . import reference as ref
from .harness import random_family, run


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.2, 0.5, 1.3], [2.0, -0.5, 0.5]])
def test_linear_matches_weighted_sum(normalize, weights):
    _, xs = random_family((5, 7), 3, seed=1)
    got = run(
        "linear",
        xs,
        model_params=[{"weight": w} for w in weights],
        params={"normalize": normalize},
    )
    np.testing.assert_allclose(got, ref.linear(xs, weights, normalize), rtol=1e-12, atol=1e-12)


def test_equal_weights_is_the_plain_average():
    _, xs = random_family((3, 4, 2), 4, seed=2)
    got = run("linear", xs, model_params=[{"weight": 0.7}] * 4)
    np.testing.assert_allclose(got, np.mean(xs, axis=0), atol=1e-12)


def test_normalize_is_default_and_scale_invariant():
    _, xs = random_family((6,), 2, seed=3)
    a = run("linear", xs, model_params=[{"weight": 1}, {"weight": 3}])
    b = run("linear", xs, model_params=[{"weight": 10}, {"weight": 30}])
    np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(a, 0.25 * xs[0] + 0.75 * xs[1], atol=1e-12)


def test_single_model_is_identity_and_zero_inputs_stay_zero():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(run("linear", [x], model_params=[{"weight": 0.3}]), x)
    zeros = [np.zeros((4, 4))] * 3
    assert not run("linear", zeros, model_params=[{"weight": 1.0}] * 3).any()


def test_normalize_with_weights_summing_to_zero_is_refused():
    with pytest.raises(ValueError, match="sum to 0"):
        linear([torch.ones(2), torch.zeros(2)], [1.0, -1.0], normalize=True)


def test_bfloat16_inputs_keep_their_dtype():
    _, xs = random_family((8, 8), 2, seed=4)
    got = run("linear", xs, model_params=[{"weight": 1.0}] * 2, dtype=torch.bfloat16)
    np.testing.assert_allclose(got, ref.linear(xs, [1, 1], True), atol=2e-2)

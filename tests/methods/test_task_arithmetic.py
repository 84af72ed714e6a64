"""task_arithmetic: B + λ Σ wᵢ(Wᵢ − B), against a numpy loop."""

from __future__ import annotations

import numpy as np
import pytest

from . import reference as ref
from .harness import random_family, run


@pytest.mark.parametrize("lambda_", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_reference(lambda_, normalize):
    base, xs = random_family((4, 9), 3, seed=5)
    weights = [0.3, 1.0, -0.4]
    got = run(
        "task_arithmetic",
        xs,
        base=base,
        model_params=[{"weight": w} for w in weights],
        params={"lambda": lambda_, "normalize": normalize},
    )
    deltas = [x - base for x in xs]
    expected = ref.combine(
        base, deltas, weights, consensus=False, normalize=normalize, lambda_=lambda_
    )
    np.testing.assert_allclose(got, expected, atol=1e-12)
    if not normalize:  # the closed form, written out
        closed = base + lambda_ * sum(w * (x - base) for w, x in zip(weights, xs, strict=True))
        np.testing.assert_allclose(got, closed, atol=1e-12)


def test_default_is_unnormalized_sum_of_task_vectors():
    base, xs = random_family((10,), 2, seed=6)
    got = run("task_arithmetic", xs, base=base, model_params=[{"weight": 1.0}] * 2)
    np.testing.assert_allclose(got, xs[0] + xs[1] - base, atol=1e-12)


def test_zero_task_vectors_give_the_base():
    base = np.random.default_rng(7).normal(size=(3, 3))
    got = run(
        "task_arithmetic", [base.copy(), base.copy()], base=base, model_params=[{"weight": 0.8}] * 2
    )
    np.testing.assert_allclose(got, base, atol=1e-12)


def test_weights_summing_to_zero_with_normalize_do_not_divide_by_zero():
    base, xs = random_family((5,), 2, seed=8)
    got = run(
        "task_arithmetic",
        xs,
        base=base,
        model_params=[{"weight": 1.0}, {"weight": -1.0}],
        params={"normalize": True},
    )
    np.testing.assert_allclose(got, base + (xs[0] - base) - (xs[1] - base), atol=1e-12)

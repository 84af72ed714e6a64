"""model_stock: t·mean(Wᵢ) + (1 − t)·B with t = N cos θ / (1 + (N − 1) cos θ)."""

from __future__ import annotations

import numpy as np
import pytest

from dammerge.methods.model_stock import model_stock

from . import reference as ref
from .harness import random_family, run, tensor


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(8, 6), (12,), (4, 3, 5)])
def test_model_stock_matches_reference(n, filter_wise, shape):
    base, xs = random_family(shape, n, seed=61)
    # correlated task vectors, so cos θ is clearly positive as between real fine-tunes
    shared = np.random.default_rng(62).normal(size=shape)
    xs = [x + 0.2 * shared for x in xs]
    got = run("model_stock", xs, base=base, params={"filter_wise": filter_wise})
    np.testing.assert_allclose(got, ref.model_stock(base, xs, filter_wise), atol=1e-12)


def test_two_models_by_hand():
    base = np.zeros(2)
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # cos = 0 → t = 0 → the base
    np.testing.assert_allclose(run("model_stock", [a, b], base=base), base, atol=1e-12)
    a, b = np.array([1.0, 1.0]), np.array([1.0, 0.0])  # cos = 1/√2 → t = 2c/(1+c)
    c = 1 / np.sqrt(2)
    t = 2 * c / (1 + c)
    np.testing.assert_allclose(run("model_stock", [a, b], base=base), t * (a + b) / 2)


def test_identical_fine_tunes_give_that_model():
    base, (x,) = random_family((5, 5), 1, seed=63)
    got = run("model_stock", [x, x.copy(), x.copy()], base=base)
    np.testing.assert_allclose(got, x, atol=1e-12)


def test_zero_task_vectors_give_the_base():
    base = np.random.default_rng(64).normal(size=(4, 3))
    got = run("model_stock", [base.copy(), base.copy()], base=base)
    np.testing.assert_allclose(got, base)
    assert np.isfinite(got).all()


def test_needs_two_models():
    with pytest.raises(ValueError, match="two models"):
        model_stock(tensor(np.zeros(3)), [tensor(np.ones(3))])


def test_opposite_task_vectors_keep_the_base():
    """Two exactly opposite task vectors: cos = −1, so 1 + (N − 1) cos = 0 and there is no
    finite step; the base is kept (mergekit does the same) instead of inf or NaN."""
    base = np.array([0.5, -1.0, 2.0])
    delta = np.array([1.0, 2.0, -0.5])
    got = run("model_stock", [base + delta, base - delta], base=base)
    np.testing.assert_allclose(got, base, atol=1e-12)

"""breadcrumbs / breadcrumbs_ties: drop the top-γ outliers, keep the next `density` by
magnitude; against a sort-and-slice reference."""

from __future__ import annotations

import numpy as np
import pytest

from . import reference as ref
from .harness import random_family, run


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.2, 0.05), (0.9, 0.2), (1.0, 0.1)])
def test_breadcrumbs_matches_reference(method, density, gamma):
    base, xs = random_family((10, 12), 3, seed=31)
    weights = [1.0, 0.4, 0.7]
    got = run(
        method,
        xs,
        base=base,
        model_params=[{"weight": w, "density": density, "gamma": gamma} for w in weights],
        params={"normalize": True},
    )
    deltas = [ref.band(x - base, density, gamma) for x in xs]
    expected = ref.combine(
        base, deltas, weights, consensus=method == "breadcrumbs_ties", normalize=True
    )
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_band_by_hand():
    base = np.zeros(10)
    x = np.array([10.0, -9.0, 8.0, 7.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    got = run(
        "breadcrumbs", [x], base=base, model_params=[{"weight": 1.0, "density": 0.3, "gamma": 0.2}]
    )
    # the 2 largest (10, −9) are outliers; the next 3 (8, 7, −6) are kept; the small rest drops
    np.testing.assert_allclose(got, [0, 0, 8.0, 7.0, -6.0, 0, 0, 0, 0, 0])


def test_outliers_give_way_when_density_needs_them():
    base = np.zeros(10)
    x = np.arange(1.0, 11.0)
    got = run(
        "breadcrumbs", [x], base=base, model_params=[{"weight": 1.0, "density": 0.9, "gamma": 0.5}]
    )
    expected = x.copy()
    expected[9] = 0.0  # 9 kept, so of the 5 outliers asked for only the largest can go
    np.testing.assert_allclose(got, expected)


def test_small_tensor_with_gamma_rounding_to_zero_keeps_the_top():
    # int(0.01 * 50) = 0 outliers: keep the 25 largest (mergekit's slice would keep nothing)
    base, (x,) = random_family((50,), 1, seed=32)
    got = run(
        "breadcrumbs", [x], base=base, model_params=[{"weight": 1.0, "density": 0.5, "gamma": 0.01}]
    )
    np.testing.assert_allclose(got, base + ref.trim(x - base, 0.5), atol=1e-12)


def test_density_zero_and_zero_vectors():
    base, xs = random_family((8,), 2, seed=33)
    got = run(
        "breadcrumbs_ties",
        xs,
        base=base,
        model_params=[{"weight": 1.0, "density": 0.0, "gamma": 0.1}] * 2,
    )
    np.testing.assert_allclose(got, base)
    got = run(
        "breadcrumbs", [base.copy()], base=base, model_params=[{"weight": 1.0, "density": 0.5}]
    )
    np.testing.assert_allclose(got, base)


def test_l1_rescale_option():
    base, (x,) = random_family((40,), 1, seed=34)
    got = run(
        "breadcrumbs",
        [x],
        base=base,
        model_params=[{"weight": 1.0, "density": 0.4, "gamma": 0.1}],
        params={"rescale": True},
    )
    delta = x - base
    expected = base + ref.l1_rescaled(delta, ref.band(delta, 0.4, 0.1))
    np.testing.assert_allclose(got, expected, atol=1e-12)

"""karcher: the Karcher (Riemannian) mean of the models' directions on the unit sphere, at
their mean norm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dammerge.methods.sphere import karcher_mean

from . import reference as ref
from .harness import run, tensor


def karcher(xs, **params):
    return run("karcher", xs, params=params)


def spread(n: int, seed: int, size: int = 12) -> list[np.ndarray]:
    """Tensors whose directions lie well apart (angles near 1 radian) with varied norms."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=size)
    return [(centre + 1.2 * rng.normal(size=size)) * (1 + k) for k in range(n)]


@pytest.mark.parametrize("n", [3, 4])
def test_matches_a_brute_force_descent(n):
    xs = spread(n, seed=91)
    got = karcher(xs, max_iter=200, tol=1e-12)
    np.testing.assert_allclose(got, ref.karcher_by_descent(xs, [1.0] * n), atol=1e-9)


def test_two_points_with_weights_give_the_geodesic_point():
    """For two directions the weighted Karcher mean lies on their geodesic at the second
    weight's share: SLERP at t = α₂, which the chordal starting point is not."""
    a, b = spread(2, seed=92)
    units = [x / np.linalg.norm(x) for x in (a, b)]
    got = karcher_mean([tensor(a), tensor(b)], [0.25, 0.75], max_iter=100, tol=1e-14).numpy()
    scale = 0.25 * np.linalg.norm(a) + 0.75 * np.linalg.norm(b)
    np.testing.assert_allclose(got, scale * ref.slerp(0.75, *units), atol=1e-10)
    chordal = 0.25 * units[0] + 0.75 * units[1]
    start = scale * chordal / np.linalg.norm(chordal)
    assert np.abs(got - start).max() > 1e-3  # the descent moved


def test_equal_weights_give_slerp_halfway_at_the_mean_norm():
    a, b = spread(2, seed=93)
    units = [x / np.linalg.norm(x) for x in (a, b)]
    mean_norm = (np.linalg.norm(a) + np.linalg.norm(b)) / 2
    np.testing.assert_allclose(karcher([a, b]), mean_norm * ref.slerp(0.5, *units), atol=1e-12)


def test_no_iterations_give_the_normalised_chordal_mean():
    xs = spread(3, seed=94)
    units = [x / np.linalg.norm(x) for x in xs]
    chordal = sum(units) / 3
    mean_norm = sum(np.linalg.norm(x) for x in xs) / 3
    expected = mean_norm * chordal / np.linalg.norm(chordal)
    np.testing.assert_allclose(karcher(xs, max_iter=0), expected, atol=1e-12)


def test_stops_once_the_step_is_shorter_than_tol():
    xs = spread(3, seed=95)
    loose = karcher(xs, max_iter=100, tol=1e-2)
    exact = karcher(xs, max_iter=100, tol=1e-13)
    assert 0 < np.abs(loose - exact).max() < 1e-2 * np.linalg.norm(exact)


def test_a_zero_tensor_has_no_direction_but_its_norm_counts():
    x = spread(1, seed=96)[0]
    np.testing.assert_allclose(karcher([x, np.zeros_like(x)]), 0.5 * x, atol=1e-12)
    assert not karcher([np.zeros(4), np.zeros(4)]).any()


def test_one_model_is_itself():
    x = spread(1, seed=97)[0]
    assert np.array_equal(karcher([x]), x)


def test_orthogonal_unit_vectors_meet_at_the_diagonal():
    got = karcher([np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])])
    np.testing.assert_allclose(got, [math.sqrt(0.5), math.sqrt(0.5), 0.0], atol=1e-12)

"""TIES: trim, elect sign (sum, ties → +), disjoint mean; against a per-entry loop."""

from __future__ import annotations

import numpy as np
import pytest

from . import reference as ref
from .harness import random_family, run


def ties_reference(base, xs, weights, densities, normalize=True, lambda_=1.0, rescale=False):
    deltas = []
    for x, d in zip(xs, densities, strict=True):
        kept = ref.trim(x - base, d)
        deltas.append(ref.l1_rescaled(x - base, kept) if rescale else kept)
    return ref.combine(base, deltas, weights, consensus=True, normalize=normalize, lambda_=lambda_)


@pytest.mark.parametrize("densities", [[1.0, 1.0, 1.0], [0.5, 0.3, 0.8], [0.1, 0.9, 0.25]])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(densities, normalize):
    base, xs = random_family((6, 8), 3, seed=11)
    weights = [1.0, 0.6, 0.3]
    got = run(
        "ties",
        xs,
        base=base,
        model_params=[{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
        params={"normalize": normalize},
    )
    np.testing.assert_allclose(
        got, ties_reference(base, xs, weights, densities, normalize), atol=1e-12
    )


def test_lambda_and_l1_rescale_option():
    base, xs = random_family((40,), 2, seed=12)
    got = run(
        "ties",
        xs,
        base=base,
        model_params=[{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}],
        params={"lambda": 0.7, "rescale": True},
    )
    expected = ties_reference(base, xs, [1.0, 0.5], [0.3, 0.6], lambda_=0.7, rescale=True)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_hand_computed_sign_election_and_disjoint_mean():
    base = np.zeros(4)
    a = np.array([2.0, 1.0, -1.0, 3.0])
    b = np.array([-1.0, 1.0, -3.0, -3.0])
    got = run("ties", [a, b], base=base, model_params=[{"weight": 1.0}] * 2)
    # entry 0: sum +1 → +, only a agrees → 2/1; entry 1: both + → (1+1)/2;
    # entry 2: both − → (−1−3)/2; entry 3: exact tie 3−3=0 → elected + → only a → 3/1
    np.testing.assert_allclose(got, [2.0, 1.0, -2.0, 3.0])


def test_exact_sign_tie_elects_plus_and_uses_weighted_sum():
    base = np.zeros(3)
    a = np.array([1.0, 1.0, -2.0])
    b = np.array([-2.0, -1.0, 1.0])
    # weights 2 and 1: weighted sums 2−2=0 (tie → +), 2−1=1 (+), −4+1=−3 (−)
    got = run("ties", [a, b], base=base, model_params=[{"weight": 2.0}, {"weight": 1.0}])
    np.testing.assert_allclose(got, [1.0, 1.0, -2.0])  # disjoint mean divides by agreeing weights


def test_density_zero_and_zero_task_vectors_give_the_base():
    base, xs = random_family((5, 5), 2, seed=13)
    got = run("ties", xs, base=base, model_params=[{"weight": 1.0, "density": 0.0}] * 2)
    np.testing.assert_allclose(got, base)
    got = run("ties", [base.copy(), base.copy()], base=base, model_params=[{"weight": 1.0}] * 2)
    np.testing.assert_allclose(got, base)


def test_all_zero_inputs_stay_zero():
    zeros = np.zeros((3, 4))
    got = run(
        "ties", [zeros, zeros], base=zeros, model_params=[{"weight": 1.0, "density": 0.5}] * 2
    )
    assert not got.any() and np.isfinite(got).all()


def test_density_one_keeps_every_entry():
    base, xs = random_family((30,), 1, seed=14)
    got = run("ties", xs, base=base, model_params=[{"weight": 1.0, "density": 1.0}])
    np.testing.assert_allclose(got, xs[0], atol=1e-12)  # one model: the disjoint mean is itself


def test_trim_keeps_int_density_times_n_largest():
    base = np.zeros(10)
    x = np.array([0.1, -5.0, 0.3, 4.0, -0.2, 0.05, 3.0, -0.4, 0.0, 1.0])
    got = run("ties", [x], base=base, model_params=[{"weight": 1.0, "density": 0.35}])
    expected = np.zeros(10)
    expected[[1, 3, 6]] = [-5.0, 4.0, 3.0]  # int(0.35 * 10) = 3 largest magnitudes
    np.testing.assert_allclose(got, expected)

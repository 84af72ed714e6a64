"""nuslerp: SLERP of two models (of their task vectors with a base), t = w₂ / (w₁ + w₂), on
whole tensors or vector by vector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from . import reference as ref
from .harness import random_family, run


def nuslerp(xs, weights, base=None, dtype=torch.float64, **params):
    return run(
        "nuslerp",
        xs,
        base=base,
        model_params=[{"weight": w} for w in weights],
        params=params,
        dtype=dtype,
    )


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_weights_one_minus_t_and_t_without_base_are_slerp(t):
    """mergekit's documented equivalence with the original slerp method."""
    rng = np.random.default_rng(71)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    np.testing.assert_allclose(nuslerp([a, b], [1 - t, t]), ref.slerp(t, a, b), atol=1e-12)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (4, 3, 2, 5), (9,)])
def test_matches_reference_with_and_without_base(flatten, row_wise, shape):
    base, (a, b) = random_family(shape, 2, seed=72, scale=0.5)
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    t = 0.7 / (0.3 + 0.7)
    expected = ref.nuslerp(t, a, b, flatten, row_wise)
    np.testing.assert_allclose(nuslerp([a, b], [0.3, 0.7], **params), expected, atol=1e-12)
    on_deltas = base + ref.nuslerp(t, a - base, b - base, flatten, row_wise)
    got = nuslerp([a, b], [0.3, 0.7], base=base, **params)
    np.testing.assert_allclose(got, on_deltas, atol=1e-12)


def test_row_wise_chooses_which_vectors_are_interpolated():
    """Without flatten, the rows W[i, :] are interpolated (the default), with
    nuslerp_row_wise the columns W[:, j]."""
    rng = np.random.default_rng(75)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    rows = nuslerp([a, b], [0.6, 0.4], nuslerp_flatten=False)
    expected_rows = np.stack([ref.slerp(0.4, a[i], b[i]) for i in range(3)])
    np.testing.assert_allclose(rows, expected_rows, atol=1e-12)
    columns = nuslerp([a, b], [0.6, 0.4], nuslerp_flatten=False, nuslerp_row_wise=True)
    expected_columns = np.stack([ref.slerp(0.4, a[:, j], b[:, j]) for j in range(4)], axis=1)
    np.testing.assert_allclose(columns, expected_columns, atol=1e-12)
    assert np.abs(rows - columns).max() > 1e-3


def test_row_wise_on_a_convolution_kernel_interpolates_each_input_position_across_outputs():
    """On a 4-D kernel ``W[o, i, h, w]`` the row-wise vectors are ``W[:, i, h, w]``: one SLERP
    per input channel and position, across the output channels (mergekit swaps the first and
    last axes, which takes the same vectors)."""
    rng = np.random.default_rng(76)
    a, b = rng.normal(size=(6, 3, 2, 2)), rng.normal(size=(6, 3, 2, 2))
    got = nuslerp([a, b], [0.7, 0.3], nuslerp_flatten=False, nuslerp_row_wise=True)
    for i, h, w in np.ndindex(3, 2, 2):
        expected = ref.slerp(0.3, a[:, i, h, w], b[:, i, h, w])
        np.testing.assert_allclose(got[:, i, h, w], expected, atol=1e-12)


def test_weights_summing_to_zero_interpolate_halfway():
    rng = np.random.default_rng(73)
    a, b = rng.normal(size=8), rng.normal(size=8)
    np.testing.assert_allclose(nuslerp([a, b], [-0.5, 0.5]), ref.slerp(0.5, a, b), atol=1e-12)


def test_parallel_vectors_interpolate_linearly_without_nan():
    a = np.random.default_rng(74).normal(size=(3, 4))
    b = a.copy()
    b[1] *= 2.0  # one row scaled, the others identical
    got = nuslerp([a, b], [0.75, 0.25], nuslerp_flatten=False)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, 0.75 * a + 0.25 * b, atol=1e-9)
    exact = nuslerp([a, b], [0.75, 0.25], nuslerp_flatten=False, dtype=torch.float32)
    np.testing.assert_allclose(exact, 0.75 * a + 0.25 * b, rtol=1e-6)


def test_nearly_parallel_tensors_still_curve():
    """No 0.9995 threshold as in slerp: a pair at cos θ = 0.9999 stays on the circle."""
    angle = math.acos(0.9999)
    a, b = np.array([1.0, 0.0]), np.array([math.cos(angle), math.sin(angle)])
    assert np.linalg.norm(nuslerp([a, b], [0.5, 0.5])) == pytest.approx(1.0, abs=1e-12)

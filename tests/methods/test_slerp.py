"""slerp: spherical interpolation base (t=0) → other model (t=1); lerp when (anti-)parallel."""

from __future__ import annotations

import math

import numpy as np
import pytest

from . import reference as ref
from .harness import run


def slerp(t, v0, v1):
    return run("slerp", [v1], base=v0, params={"t": t})


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_slerp_matches_reference(t):
    rng = np.random.default_rng(51)
    v0, v1 = rng.normal(size=(6, 7)), rng.normal(size=(6, 7))
    np.testing.assert_allclose(slerp(t, v0, v1), ref.slerp(t, v0, v1), atol=1e-12)


def test_endpoints_are_the_two_models():
    rng = np.random.default_rng(52)
    v0, v1 = rng.normal(size=20), rng.normal(size=20)
    np.testing.assert_allclose(slerp(0.0, v0, v1), v0, atol=1e-12)
    np.testing.assert_allclose(slerp(1.0, v0, v1), v1, atol=1e-12)


def test_orthogonal_unit_vectors_stay_on_the_circle():
    v0, v1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    mid = slerp(0.5, v0, v1)
    np.testing.assert_allclose(mid, [math.sqrt(0.5), math.sqrt(0.5)], atol=1e-12)
    third = slerp(1 / 3, v0, v1)
    np.testing.assert_allclose(third, [math.cos(math.pi / 6), math.sin(math.pi / 6)], atol=1e-12)


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_parallel_and_antiparallel_fall_back_to_lerp(factor, t):
    v0 = np.random.default_rng(53).normal(size=(4, 5))
    v1 = factor * v0
    got = slerp(t, v0, v1)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, (1 - t) * v0 + t * v1, atol=1e-12)


def test_threshold_between_slerp_and_lerp():
    def pair(angle):
        return np.array([1.0, 0.0]), np.array([math.cos(angle), math.sin(angle)])

    near = pair(math.acos(0.9999))  # |cos| above 0.9995: lerp
    np.testing.assert_allclose(slerp(0.5, *near), 0.5 * near[0] + 0.5 * near[1], atol=1e-12)
    far = pair(math.acos(0.999))  # below: a true slerp, of unit norm
    assert np.linalg.norm(slerp(0.5, *far)) == pytest.approx(1.0, abs=1e-12)
    assert np.linalg.norm(0.5 * far[0] + 0.5 * far[1]) < 1.0 - 1e-5


def test_zero_tensor_interpolates_linearly_without_nan():
    v1 = np.arange(1.0, 7.0)
    got = slerp(0.25, np.zeros(6), v1)
    np.testing.assert_allclose(got, 0.25 * v1)
    assert not slerp(0.5, np.zeros(3), np.zeros(3)).any()

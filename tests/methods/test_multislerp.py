"""multislerp: a weighted mean of N models (of their task vectors with a base) on the sphere,
at their weighted mean norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dammerge.methods.sphere import multislerp as multislerp_kernel

from . import reference as ref
from .harness import random_family, run, tensor


def multislerp(xs, weights, base=None, **params):
    return run(
        "multislerp",
        xs,
        base=base,
        model_params=[{"weight": w} for w in weights],
        params=params,
    )


def closed_form(xs, weights, normalize=True):
    """The exponential map of a vanishing tangent mean: the normalised weighted sum of the
    directions, times the weighted sum of the norms (the kernel's ``eps = 1e-8`` in the norms
    moves it by about 1e-8 relative)."""
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = [np.linalg.norm(x) for x in xs]
    direction = sum(wi * x / n for wi, x, n in zip(w, xs, norms, strict=True))
    return direction / np.linalg.norm(direction) * sum(w * norms)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_the_closed_form(n, normalize):
    _, xs = random_family((6, 4), n, seed=81, scale=1.0)
    weights = [0.5, 1.5, 0.7, 0.2, 1.1][:n]
    got = multislerp(xs, weights, normalize_weights=normalize)
    np.testing.assert_allclose(got, closed_form(xs, weights, normalize), rtol=1e-7)


def test_with_a_base_works_on_task_vectors():
    base, xs = random_family((5, 5), 3, seed=82)
    weights = [0.2, 0.5, 0.3]
    deltas = [x - base for x in xs]
    got = multislerp(xs, weights, base=base)
    np.testing.assert_allclose(got, base + closed_form(deltas, weights), rtol=1e-7)


def test_two_models_of_equal_norm_and_weight_give_slerp_halfway():
    rng = np.random.default_rng(83)
    a, b = rng.normal(size=10), rng.normal(size=10)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    np.testing.assert_allclose(multislerp([a, b], [1.0, 1.0]), ref.slerp(0.5, a, b), rtol=1e-7)


def test_one_model_is_returned_as_it_is():
    base, (x,) = random_family((3, 4), 1, seed=84)
    assert np.array_equal(multislerp([x], [0.3], base=base), x)


def test_opposite_pair_falls_back_to_the_weighted_sum_and_more_models_refuse():
    x = np.random.default_rng(85).normal(size=6)
    np.testing.assert_allclose(multislerp([x, -x], [1.0, 1.0]), np.zeros(6), atol=1e-12)
    np.testing.assert_allclose(multislerp([x, -x], [2.0, 2.0], normalize_weights=False), 0 * x)
    with pytest.raises(ValueError, match="cancel out"):
        multislerp_kernel([tensor(x), tensor(-x), tensor(np.zeros(6))], [1.0, 1.0, 1.0])


def test_weights_summing_to_zero_are_refused_when_normalized():
    xs = [torch.ones(3), torch.full((3,), 2.0)]
    with pytest.raises(ValueError, match="sum to 0"):
        multislerp_kernel(xs, [1.0, -1.0])

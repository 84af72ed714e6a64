"""DARE (dare_linear, dare_ties): seeded Bernoulli drop, rescale (l1 / density / none), then a
sum or a TIES combination.

The drop is random, so the references check what must hold for *any* mask (recovering the mask
from the output), the keep rate statistically, and, for several models, the combination against
masks drawn from an identically seeded generator (one Bernoulli draw per model, recipe order:
part of the reproducibility contract).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from . import reference as ref
from .harness import random_family, run

SHAPE = (64, 96)


def one_model(method, density, rescale_mode=None, rescale=True, seed=0, weight=1.0):
    base, (x,) = random_family(SHAPE, 1, seed=21)
    params = {"rescale": rescale}
    if rescale_mode is not None:
        params["rescale_mode"] = rescale_mode
    out = run(
        method,
        [x],
        base=base,
        model_params=[{"weight": weight, "density": density}],
        params=params,
        seed=seed,
    )
    return base, x, out


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("mode", ["l1", "density", "none"])
def test_kept_entries_are_rescaled_as_documented(method, mode):
    density = 0.3
    base, x, out = one_model(method, density, rescale_mode=mode, rescale=mode != "none")
    delta, merged = x - base, out - base
    kept = merged != 0
    assert 0.25 < kept.mean() < 0.35  # ~density of 6144 entries survive
    ratio = merged[kept] / delta[kept]
    if mode == "l1":  # mergekit: the L1 norm of the task vector is restored exactly
        factor = np.abs(delta).sum() / np.abs(delta * kept).sum()
        np.testing.assert_allclose(ratio, factor, rtol=1e-9)
        np.testing.assert_allclose(np.abs(merged).sum(), np.abs(delta).sum(), rtol=1e-9)
    elif mode == "density":  # the paper: divide by the keep probability
        np.testing.assert_allclose(ratio, 1 / density, rtol=1e-9)
    else:
        np.testing.assert_allclose(ratio, 1.0, rtol=1e-9)


def test_default_rescale_is_mergekit_l1():
    _, _, default = one_model("dare_linear", 0.4, seed=3)
    _, _, l1 = one_model("dare_linear", 0.4, rescale_mode="l1", seed=3)
    np.testing.assert_array_equal(default, l1)


def test_density_rescale_is_unbiased_in_expectation():
    base, x = np.zeros(20000), np.full(20000, 2.0)
    out = run(
        "dare_linear",
        [x],
        base=base,
        model_params=[{"weight": 1.0, "density": 0.2}],
        params={"rescale_mode": "density"},
        seed=5,
    )
    assert abs(out.mean() - 2.0) < 0.1
    assert set(np.unique(out)) <= {0.0, 10.0}


def test_same_seed_reproduces_and_another_seed_differs():
    _, _, a = one_model("dare_ties", 0.5, seed=7)
    _, _, b = one_model("dare_ties", 0.5, seed=7)
    _, _, c = one_model("dare_ties", 0.5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_density_one_is_deterministic_task_arithmetic_or_ties(method):
    base, xs = random_family((12, 10), 3, seed=22)
    weights = [0.5, 1.0, 0.8]
    got = run(method, xs, base=base, model_params=[{"weight": w} for w in weights], seed=1)
    expected = ref.combine(
        base, [x - base for x in xs], weights, consensus=method == "dare_ties", normalize=False
    )
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_density_zero_gives_the_base(method):
    base, xs = random_family((6, 6), 2, seed=23)
    got = run(method, xs, base=base, model_params=[{"weight": 1.0, "density": 0.0}] * 2, seed=1)
    np.testing.assert_allclose(got, base)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_multi_model_combination_with_reproduced_masks(method, normalize):
    base, xs = random_family((16, 24), 3, seed=24)
    weights, densities, seed = [1.0, 0.5, 0.7], [0.3, 0.6, 0.9], 99
    got = run(
        method,
        xs,
        base=base,
        model_params=[{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
        params={"normalize": normalize, "lambda": 0.9},
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for x, d in zip(xs, densities, strict=True):
        mask = torch.bernoulli(torch.full(x.shape, d), generator=generator).double().numpy()
        deltas.append(ref.l1_rescaled(x - base, (x - base) * mask))
    expected = ref.combine(
        base, deltas, weights, consensus=method == "dare_ties", normalize=normalize, lambda_=0.9
    )
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_zero_task_vector_is_not_rescaled_into_nan():
    base = np.ones((4, 4))
    got = run(
        "dare_linear",
        [base.copy()],
        base=base,
        model_params=[{"weight": 1.0, "density": 0.5}],
        seed=0,
    )
    np.testing.assert_allclose(got, base)


def test_unknown_rescale_mode_is_refused():
    with pytest.raises(ValueError, match="rescale_mode"):
        one_model("dare_linear", 0.5, rescale_mode="l2")

"""DELLA (della, della_linear): MagPrune keep probabilities by per-row magnitude rank
(density ± ε), rescale (mergekit's L1 by default, or the paper's 1/p), then TIES or a sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from . import reference as ref
from .harness import random_family, run


def single(density, epsilon, seed=0, shape=(32, 40), **params):
    base, (x,) = random_family(shape, 1, seed=41)
    out = run(
        "della_linear",
        [x],
        base=base,
        model_params=[{"weight": 1.0, "density": density, "epsilon": epsilon}],
        params=params,
        seed=seed,
    )
    return x - base, out - base


def test_probability_rescale_divides_each_kept_entry_by_its_own_probability():
    delta, merged = single(0.5, 0.3, rescale_mode="probability")
    probs = ref.della_probabilities(delta, 0.5, 0.3)
    kept = merged != 0
    np.testing.assert_allclose(merged[kept], delta[kept] / probs[kept], rtol=1e-6)


def test_default_rescale_restores_the_l1_norm_like_mergekit():
    delta, merged = single(0.4, 0.2)
    kept = merged != 0
    factor = np.abs(delta).sum() / np.abs(delta[kept]).sum()
    np.testing.assert_allclose(merged[kept], delta[kept] * factor, rtol=1e-9)
    np.testing.assert_allclose(np.abs(merged).sum(), np.abs(delta).sum(), rtol=1e-9)


def test_no_rescale_keeps_entries_unchanged():
    delta, merged = single(0.4, 0.2, rescale=False)
    kept = merged != 0
    np.testing.assert_allclose(merged[kept], delta[kept])


def test_keep_rate_rises_with_magnitude_rank_within_each_row():
    rows, width, density, epsilon = 3000, 5, 0.5, 0.3
    rng = np.random.default_rng(42)
    delta = rng.normal(size=(rows, width))
    out = run(
        "della_linear",
        [delta],
        base=np.zeros_like(delta),
        model_params=[{"weight": 1.0, "density": density, "epsilon": epsilon}],
        params={"rescale": False},
        seed=3,
    )
    ranks = np.argsort(np.argsort(np.abs(delta), axis=1), axis=1)
    for rank in range(width):
        rate = (out[ranks == rank] != 0).mean()
        expected = density - epsilon + 2 * epsilon * rank / (width - 1)
        assert abs(rate - expected) < 0.035, (rank, rate, expected)


def test_one_dimensional_tensors_are_one_row():
    delta, merged = single(0.5, 0.2, shape=(200,), rescale_mode="probability")
    probs = ref.della_probabilities(delta, 0.5, 0.2)
    assert probs.min() == pytest.approx(0.3) and probs.max() == pytest.approx(0.7)
    kept = merged != 0
    np.testing.assert_allclose(merged[kept], delta[kept] / probs[kept], rtol=1e-6)


def test_default_epsilon_is_mergekits_0_15():
    delta, merged = single(0.5, 0.15, seed=9)
    rng_delta = run(
        "della_linear",
        [delta],
        base=np.zeros_like(delta),
        model_params=[{"weight": 1.0, "density": 0.5}],
        seed=9,
    )
    np.testing.assert_allclose(rng_delta, merged, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "consensus", "normalize"), [("della", True, True), ("della_linear", False, False)]
)
def test_density_one_is_deterministic(method, consensus, normalize):
    base, xs = random_family((9, 11), 3, seed=43)
    weights = [1.0, 0.3, 0.6]
    got = run(method, xs, base=base, model_params=[{"weight": w} for w in weights], seed=0)
    expected = ref.combine(
        base, [x - base for x in xs], weights, consensus=consensus, normalize=normalize
    )
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_density_zero_gives_the_base(method):
    base, xs = random_family((5, 6), 2, seed=44)
    got = run(method, xs, base=base, model_params=[{"weight": 1.0, "density": 0.0}] * 2, seed=1)
    np.testing.assert_allclose(got, base)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("mode", ["l1", "probability"])
def test_multi_model_combination_with_reproduced_masks(method, mode):
    base, xs = random_family((12, 20), 3, seed=45)
    weights, densities, epsilons, seed = [1.0, 0.5, 0.8], [0.4, 0.6, 0.5], [0.1, 0.2, 0.3], 17
    got = run(
        method,
        xs,
        base=base,
        model_params=[
            {"weight": w, "density": d, "epsilon": e}
            for w, d, e in zip(weights, densities, epsilons, strict=True)
        ],
        params={"rescale_mode": mode, "lambda": 1.1},
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for x, d, e in zip(xs, densities, epsilons, strict=True):
        delta = x - base
        probs = ref.della_probabilities(delta, d, e)
        mask = torch.bernoulli(torch.tensor(probs, dtype=torch.float32), generator=generator)
        kept = delta * mask.double().numpy()
        deltas.append(kept / probs if mode == "probability" else ref.l1_rescaled(delta, kept))
    expected = ref.combine(
        base, deltas, weights, consensus=method == "della", normalize=method == "della", lambda_=1.1
    )
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_same_seed_reproduces_and_another_seed_differs():
    _, a = single(0.5, 0.1, seed=1)
    _, b = single(0.5, 0.1, seed=1)
    _, c = single(0.5, 0.1, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.9, 0.2)])
def test_probabilities_outside_zero_one_are_refused(density, epsilon):
    with pytest.raises(ValueError, match="density"):
        single(density, epsilon)

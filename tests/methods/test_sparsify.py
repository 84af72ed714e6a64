"""The shared kernels of the task-vector family (dammerge.methods.sparsify), one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dammerge.methods import sparsify
from dammerge.methods.sparsify import (
    bernoulli_mask,
    kth_smallest,
    magnitude_band,
    magnitude_prune,
    magnitude_ranked_drop,
    random_drop,
    rescale_kept,
    top_k_mask,
)

from . import reference as ref
from .harness import tensor


@pytest.mark.parametrize("density", [0.0, 0.01, 0.33, 0.5, 0.999, 1.0, 1.5])
def test_magnitude_prune_matches_top_k(density):
    delta = np.random.default_rng(71).normal(size=(7, 9))
    got = magnitude_prune(tensor(delta), density).numpy()
    np.testing.assert_array_equal(got, ref.trim(delta, density))


def test_magnitude_prune_breaks_exact_ties_by_position():
    got = magnitude_prune(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]), 0.4)
    np.testing.assert_array_equal(got.numpy(), [1.0, -1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.1), (0.0, 0.2), (0.95, 0.3), (0.5, 0.0)])
def test_magnitude_band_matches_reference(density, gamma):
    delta = np.random.default_rng(72).normal(size=(5, 11))
    got = magnitude_band(tensor(delta), density, gamma).numpy()
    np.testing.assert_array_equal(got, ref.band(delta, density, gamma))


def test_rescale_kept_modes():
    original = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = torch.tensor([0.0, -2.0, 0.0, -4.0])
    torch.testing.assert_close(rescale_kept(original, kept, 0.5, "none"), kept)
    torch.testing.assert_close(rescale_kept(original, kept, 0.5, "density"), kept * 2)
    torch.testing.assert_close(rescale_kept(original, kept, 0.5, "l1"), kept * (10 / 6))
    zeros = torch.zeros(4)
    torch.testing.assert_close(rescale_kept(original, zeros, 0.5, "l1"), zeros)  # nothing kept


def test_bernoulli_mask_per_entry_probabilities():
    probs = torch.tensor([0.0, 1.0, 0.25]).repeat(20000, 1)
    mask = bernoulli_mask(probs, probs, torch.Generator().manual_seed(0))
    rates = mask.mean(dim=0)
    assert rates[0] == 0 and rates[1] == 1 and abs(rates[2] - 0.25) < 0.01
    again = bernoulli_mask(probs, probs, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mask, again)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_random_drop_boundaries_are_exact(density):
    delta = torch.randn(50, generator=torch.Generator().manual_seed(1))
    got = random_drop(delta, density, torch.Generator().manual_seed(2), "density")
    torch.testing.assert_close(got, delta * density)


def test_magnitude_ranked_drop_with_zero_epsilon_is_uniform_dare():
    delta = torch.randn(30, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = magnitude_ranked_drop(
        delta, 0.3, 0.0, torch.Generator().manual_seed(4), rescale_mode="probability"
    )
    b = random_drop(delta, 0.3, torch.Generator().manual_seed(4), "density")
    torch.testing.assert_close(a, b)


def test_sign_election_by_hand():
    """The sign election the merges run (inside ``combine_task_vectors``)."""
    from dammerge.methods.combine import TIES_CONSENSUS, combine_task_vectors

    deltas = [torch.tensor([2.0, 0.0, -1.0, 1.0]), torch.tensor([-2.0, 0.0, -1.0, -3.0])]
    got = combine_task_vectors(
        torch.zeros(4), deltas, [1.0, 1.0], consensus=TIES_CONSENSUS, normalize=True
    )
    # column 0: tie -> + (only +2 kept); 1: zeros never count; 2: both -; 3: - wins (-3 alone)
    np.testing.assert_array_equal(got.numpy(), [2.0, 0.0, -1.0, -3.0])


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_selection_with_many_exact_ties_matches_the_stable_order(density):
    """bf16 checkpoints repeat magnitudes a lot: ties must go to the lower index, always."""
    delta = np.round(np.random.default_rng(73).normal(size=(20, 25)), 1)
    got = magnitude_prune(tensor(delta), density).numpy()
    np.testing.assert_array_equal(got, ref.trim(delta, density))
    got = magnitude_band(tensor(delta), density, 0.1).numpy()
    np.testing.assert_array_equal(got, ref.band(delta, density, 0.1))
    bf16 = torch.tensor(delta, dtype=torch.bfloat16)
    as_np = bf16.double().numpy()
    np.testing.assert_array_equal(
        magnitude_prune(bf16, density).double().numpy(), ref.trim(as_np, density)
    )


def _stable_top_k(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: the first k of a stable descending sort."""
    keep = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    keep[torch.argsort(magnitudes, descending=True, stable=True)[:k]] = True
    return keep


@pytest.mark.parametrize(
    "levels, fraction",
    [(None, 0.5), (7, 0.3), (7, 0.9), (2, 0.5), (1, 0.25)],
    ids=["continuous", "7-levels-30%", "7-levels-90%", "2-levels", "all-equal"],
)
def test_top_k_mask_on_a_large_tensor_matches_the_stable_sort(levels, fraction):
    """Above the direct-selection size the sampled bracket and the block-wise tie cut are
    used; with a handful of distinct magnitudes millions of entries tie at the threshold."""
    generator = torch.Generator().manual_seed(11)
    n = (1 << 21) + 12345  # not a multiple of the counting block
    values = torch.rand(n, generator=generator)
    if levels is not None:
        values = torch.floor(values * levels) / levels
    k = int(fraction * n)
    assert torch.equal(top_k_mask(values, k), _stable_top_k(values, k))


def test_top_k_mask_when_the_sampled_bracket_misses():
    """A sample that sees only one value brackets nothing: the direct selection answers."""
    values = torch.zeros(1 << 21)
    values[1::4096] = torch.arange(1, 513, dtype=torch.float32)  # the sample's stride skips them
    k = 300
    assert torch.equal(top_k_mask(values, k), _stable_top_k(values, k))


@pytest.mark.parametrize("by_sort", [False, True], ids=["kthvalue", "sort"])
def test_kth_smallest_is_the_entry_of_that_rank_in_numpys_sort(by_sort):
    """The CPU's selection and the GPU's sort answer alike, ties and NaN (largest) included."""
    rng = np.random.default_rng(5)
    cases = (rng.normal(size=1001), np.round(rng.normal(size=999), 1), np.array([3, np.nan, 1, 2]))
    for values in cases:
        ordered = np.sort(values)  # NaN last
        for rank in (1, 2, len(values) // 2, len(values)):
            got = kth_smallest(torch.tensor(values), rank, by_sort=by_sort)
            np.testing.assert_array_equal(got.numpy(), ordered[rank - 1])


@pytest.mark.parametrize("levels", [None, 7], ids=["continuous", "7-levels"])
def test_top_k_mask_selecting_by_sort_as_on_a_gpu_matches_the_stable_sort(levels, monkeypatch):
    """The GPU's path through the sampled bracket, forced on the CPU."""
    monkeypatch.setattr(
        sparsify, "kth_smallest", lambda values, rank: kth_smallest(values, rank, by_sort=True)
    )
    generator = torch.Generator().manual_seed(12)
    values = torch.rand((1 << 21) + 7, generator=generator)
    if levels is not None:
        values = torch.floor(values * levels) / levels
    k = int(0.4 * values.numel())
    assert torch.equal(top_k_mask(values, k), _stable_top_k(values, k))

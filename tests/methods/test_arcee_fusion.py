"""arcee_fusion: the other model's entries whose change is an outlier in importance
(|δ| × the row's KL divergence), the base elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dammerge.methods.selective import order_statistic

from . import reference as ref
from .harness import random_family, run, tensor


def fusion(base, other):
    return run("arcee_fusion", [other], base=base)


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 8), (25,)])
def test_matches_reference(shape):
    base, (other,) = random_family(shape, 1, seed=111, scale=0.3)
    # heavy-tailed changes, as fine-tunes have: some entries are outliers
    other = base + (other - base) ** 3
    got = fusion(base, other)
    expected = ref.arcee_fusion(base, other)
    np.testing.assert_array_equal(got, expected)
    taken = got == other
    assert taken.any() and not taken.all()


def test_a_row_that_shifts_its_distribution_is_taken():
    base = np.zeros((4, 6))
    other = base + 0.01 * np.random.default_rng(112).normal(size=(4, 6))
    other[2] += np.linspace(0.0, 3.0, 6)  # row 2 changes a lot, and unevenly
    got = fusion(base, other)
    assert (got[2, 3:] == other[2, 3:]).all()
    np.testing.assert_array_equal(got[[0, 1, 3]], base[[0, 1, 3]])


def test_a_taken_entry_is_the_base_plus_the_change_rounded_in_the_dtype():
    """In float32, B + (W − B) is not W where W is far from B (unrelated models): the kernel
    gives that sum, rounded as float32 arithmetic rounds it (mergekit's bits)."""
    rng = np.random.default_rng(114)
    base = np.full((4, 6), 3.0)
    other = base + 0.01 * rng.normal(size=(4, 6))
    other[2] = 1e-3 * np.arange(1.0, 7.0) ** 2  # row 2: small values, far from the base's 3
    got = run("arcee_fusion", [other], base=base, dtype=torch.float32)
    b32, w32 = base.astype(np.float32), other.astype(np.float32)
    np.testing.assert_array_equal(got[2], b32[2] + (w32[2] - b32[2]))
    np.testing.assert_array_equal(got[[0, 1, 3]], b32[[0, 1, 3]])
    assert (got[2] != w32[2]).any()  # the sum rounds at the base's scale, not W's


def test_identical_models_give_the_base():
    base, _ = random_family((5, 5), 0, seed=113)
    np.testing.assert_array_equal(fusion(base, base.copy()), base)


@pytest.mark.parametrize("n", [1, 2, 7, 1001])
def test_order_statistic_is_the_lower_quantile(n):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ranked = sorted(values.tolist())
    for fraction in (0.25, 0.5, 0.75):
        got = order_statistic(tensor(values.numpy()).reshape(1, -1), fraction)
        assert float(got) == ranked[int(fraction * (n - 1))]

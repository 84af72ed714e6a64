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

"""nearswap: each base entry moves toward the other model's by at most t."""

from __future__ import annotations

import numpy as np
import pytest

from . import reference as ref
from .harness import random_family, run


def nearswap(t, base, other):
    return run("nearswap", [other], base=base, params={"t": t})


@pytest.mark.parametrize("t", [0.0, 1e-4, 0.05, 0.2, 10.0])
def test_matches_reference(t):
    base, (other,) = random_family((7, 9), 1, seed=101)
    np.testing.assert_allclose(nearswap(t, base, other), ref.nearswap(t, base, other), atol=1e-12)


def test_each_entry_moves_by_at_most_t_and_close_ones_swap():
    base, (other,) = random_family((40,), 1, seed=102)
    t = 0.08
    got = nearswap(t, base, other)
    distance = np.abs(other - base)
    np.testing.assert_allclose(np.abs(got - base), np.minimum(t, distance), atol=1e-12)
    close = distance < t
    assert close.any() and (~close).any()
    np.testing.assert_array_equal(got[close], other[close])


def test_zero_t_keeps_the_base_and_equal_entries_stay():
    base, (other,) = random_family((5, 5), 1, seed=103)
    np.testing.assert_array_equal(nearswap(0.0, base, other), base)
    np.testing.assert_array_equal(nearswap(0.1, base, base.copy()), base)

"""ram and ramplus_tl: task-vector entries changed by one model kept whole (RAM+: amplified),
entries changed by several averaged over those models."""

from __future__ import annotations

import numpy as np
import pytest

from . import reference as ref
from .harness import random_family, run


@pytest.mark.parametrize("epsilon", [0.0, 0.05, 0.12])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_ram_matches_reference(n, epsilon):
    base, xs = random_family((8, 9), n, seed=121)
    got = run("ram", xs, base=base, params={"epsilon": epsilon})
    np.testing.assert_allclose(got, ref.ram(base, xs, epsilon), atol=1e-12)


@pytest.mark.parametrize(("r", "alpha"), [(0.1, 0.2), (0.5, 1.0), (2.0, 0.05)])
def test_ramplus_matches_reference(r, alpha):
    base, xs = random_family((8, 9), 3, seed=122)
    params = {"epsilon": 0.1, "r": r, "alpha": alpha}
    got = run("ramplus_tl", xs, base=base, params=params)
    np.testing.assert_allclose(got, ref.ram(base, xs, 0.1, r, alpha), atol=1e-12)


def test_by_hand():
    """Entries: changed by model 0 only, by both, by neither (|δ| = epsilon is unchanged)."""
    base = np.zeros(4)
    a = np.array([0.4, 0.2, 0.1, 0.0])
    b = np.array([0.0, 0.6, 0.1, -0.3])
    got = run("ram", [a, b], base=base, params={"epsilon": 0.1})
    np.testing.assert_allclose(got, [0.4, 0.4, 0.0, -0.3], atol=1e-12)
    # RAM+: model 0 has 1 shared and 1 unique entry (ρ = 1), model 1 one of each (ρ = 1)
    plus = run("ramplus_tl", [a, b], base=base, params={"epsilon": 0.1, "r": 0.5, "alpha": 0.4})
    np.testing.assert_allclose(plus, [0.4 * 1.2, 0.4, 0.0, -0.3 * 1.2], atol=1e-12)


def test_ramplus_without_strength_is_ram():
    base, xs = random_family((6, 6), 3, seed=123)
    plain = run("ram", xs, base=base, params={"epsilon": 0.08})
    plus = run("ramplus_tl", xs, base=base, params={"epsilon": 0.08, "r": 0.0})
    np.testing.assert_array_equal(plain, plus)

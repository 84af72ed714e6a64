"""sce: select top-variance entries, weight models by energy, erase minority signs, disjoint
mean; against an entry-by-entry reference, and its steps by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dammerge.methods.combine import energy_weights
from dammerge.methods.sparsify import top_variance_mask

from . import reference as ref
from .harness import random_family, run, tensor


def sce(xs, base, **params):
    return run("sce", xs, base=base, model_params=[{}] * len(xs), params=params)


@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.25, 0.01, 0.0])
@pytest.mark.parametrize(("shape", "n"), [((9, 14), 3), ((40,), 2), ((6, 5), 4)])
def test_sce_matches_reference(select_topk, shape, n):
    base, xs = random_family(shape, n, seed=81)
    got = sce(xs, base, select_topk=select_topk)
    np.testing.assert_allclose(got, ref.sce(base, xs, select_topk), rtol=1e-12, atol=1e-12)


def test_erase_and_energy_weights_by_hand():
    base = np.zeros(4)
    a = np.array([2.0, 1.0, -1.0, 0.0])
    b = np.array([-1.0, 1.0, -1.0, -2.0])
    # energies: mean a² = 6/4, mean b² = 7/4 -> weights 6/13 and 7/13
    wa, wb = 6 / 13, 7 / 13
    got = sce([a, b], base)
    # entry 0: plain sum +1 -> +, only a counts -> 2; entry 1: both + -> (wa + wb) / (wa + wb);
    # entry 2: both - -> -1; entry 3: a's zero never counts -> b alone -> -2
    np.testing.assert_allclose(got, [2.0, 1.0, -1.0, -2.0])
    # the sign is elected from the plain sum, not the weighted one: plain 3 - 3 = 0 elects +,
    # the weighted sum (wb > wa) would elect -
    a, b = np.array([3.0, 1.0]), np.array([-3.0, 2.0])
    wa, wb = 10 / 23, 13 / 23
    assert wb * -3 + wa * 3 < 0
    np.testing.assert_allclose(sce([a, b], np.zeros(2)), [3.0, (wa + 2 * wb) / (wa + wb)])


def test_select_keeps_the_entries_the_models_disagree_on():
    base = np.zeros(6)
    a = np.array([1.0, 5.0, 0.0, 2.0, -4.0, 1.0])
    b = np.array([1.0, -5.0, 0.3, 2.0, 4.0, 0.0])
    # variances: 0, 25, 0.0225, 0, 16, 0.25 -> 4 nonzero, select_topk 0.5 keeps 2: entries 1, 4
    mask = top_variance_mask([tensor(a), tensor(b)], 0.5)
    np.testing.assert_array_equal(mask.numpy(), [False, True, False, False, True, False])
    got = sce([a, b], base, select_topk=0.5)
    np.testing.assert_allclose(got, ref.sce(base, [a, b], 0.5))
    assert not got[[0, 2, 3, 5]].any()


def test_select_count_is_rounded_in_float32_like_mergekit():
    nonzero, fraction = 90, 0.7  # 90 * 0.7 = 62.99999999999999, but 63.0 in float32
    assert int(nonzero * fraction) == 62
    assert int(np.float32(nonzero) * np.float32(fraction)) == 63
    spread = torch.arange(1.0, nonzero + 1, dtype=torch.float64)
    same = torch.full((10,), 0.5, dtype=torch.float64)  # equal in both models: variance 0
    a, b = torch.cat([same, spread]), torch.cat([same, -spread])
    mask = top_variance_mask([a, b], fraction)
    assert int(mask.sum()) == 63 and mask[-63:].all()


def test_select_over_blocks_is_the_full_stack_variance():
    """Above one variance block the variance is taken block by block; ties go to the lower
    index (values on a coarse grid tie a lot)."""
    generator = torch.Generator().manual_seed(82)
    deltas = [torch.round(torch.randn(150_001, generator=generator) * 4) / 4 for _ in range(3)]
    variance = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance).to(torch.float32) * 0.3)
    expected = torch.zeros(variance.numel(), dtype=torch.bool)
    expected[torch.argsort(variance, descending=True, stable=True)[:k]] = True
    assert torch.equal(top_variance_mask(deltas, 0.3), expected)


def test_energy_weights_fall_back_to_uniform_for_tiny_task_vectors():
    tiny = [torch.full((10,), 1e-4), torch.full((10,), 3e-4)]  # energies 1e-8 and 9e-8
    assert energy_weights(tiny) == [0.5, 0.5]
    larger = [torch.full((10,), 1e-2, dtype=torch.float64), torch.full((10,), 3e-2)]
    assert energy_weights(larger) == pytest.approx([0.1, 0.9])


def test_disjoint_mean_divisor_is_floored_at_1e_6():
    base = np.zeros(1000)
    a = np.ones(1000)
    a[0] = -1e-4
    b = np.zeros(1000)
    b[0] = 1e-3  # b's weight ~1e-9: alone on entry 0's elected + sign
    got = sce([a, b], base)
    wb = (1e-6 / 1000) / (999 / 1000 + 1e-8 / 1000 + 1e-6 / 1000)
    assert got[0] == pytest.approx(wb * 1e-3 / 1e-6, rel=1e-9)
    np.testing.assert_allclose(got[1:], 1.0)


def test_single_model_and_zero_task_vectors():
    base, (x,) = random_family((5, 5), 1, seed=83)
    np.testing.assert_allclose(sce([x], base), x, atol=1e-12)  # one model: itself
    np.testing.assert_allclose(sce([x], base, select_topk=0.5), base)  # no variance: none kept
    np.testing.assert_allclose(sce([base.copy(), base.copy()], base), base)


def test_lambda_and_normalize_act_as_in_every_task_vector_row():
    base, xs = random_family((7, 3), 3, seed=84)
    plain = sce(xs, base) - base
    np.testing.assert_allclose(sce(xs, base, **{"lambda": 0.5}) - base, 0.5 * plain, atol=1e-12)
    assert not np.allclose(sce(xs, base, normalize=False), sce(xs, base))

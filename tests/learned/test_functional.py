"""The custom merged-linear function against a naive autograd implementation."""

from __future__ import annotations

import pytest
import torch

from dammerge.learned import functional
from dammerge.learned.functional import merged_linear, naive_merged_linear


def _inputs(dtype, n=3, out=5, inp=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, inp, dtype=dtype, generator=g, requires_grad=True)
    scales = torch.randn(n, inp, dtype=dtype, generator=g, requires_grad=True)
    weights = torch.randn(n, out, inp, dtype=dtype, generator=g)
    bias_scales = torch.randn(n, dtype=dtype, generator=g, requires_grad=True) if bias else None
    biases = torch.randn(n, out, dtype=dtype, generator=g) if bias else None
    return x, scales, weights, bias_scales, biases


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    x, scales, weights, bias_scales, biases = _inputs(torch.float64, bias=bias)
    assert torch.autograd.gradcheck(
        lambda a, s, bs: merged_linear(a, s, weights, bs, biases),
        (x, scales, bias_scales),
    )


@pytest.mark.parametrize("block", [None, 8, 12], ids=["one-block", "rows-of-2", "rows-of-3"])
def test_matches_naive_values_and_gradients(block, monkeypatch):
    """Also with G formed a few output rows at a time (5 rows: blocks of 2 leave a tail)."""
    if block is not None:
        monkeypatch.setattr(functional, "COLUMN_GRAD_BLOCK", block)
    x, scales, weights, bias_scales, biases = _inputs(torch.float64)
    upstream = torch.randn(2, 3, 5, dtype=torch.float64)
    grads = []
    for fn in (merged_linear, naive_merged_linear):
        out = fn(x, scales, weights, bias_scales, biases)
        grads.append((out, *torch.autograd.grad(out, (x, scales, bias_scales), upstream)))
    for ours, naive in zip(*grads, strict=True):
        torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)


def test_explicit_formula_for_column_gradient():
    """grad_c_i = column-sums((gᵀx) ⊙ W_i), written out by hand."""
    x, scales, weights, _, _ = _inputs(torch.float64, bias=False)
    out = merged_linear(x, scales, weights)
    g = torch.randn_like(out)
    (grad_scales,) = torch.autograd.grad(out, scales, g)
    outer = g.reshape(-1, 5).T @ x.detach().reshape(-1, 4)
    for i in range(3):
        expected = torch.tensor(
            [sum(outer[o, j] * weights[i, o, j] for o in range(5)) for j in range(4)],
            dtype=torch.float64,
        )
        torch.testing.assert_close(grad_scales[i], expected)


def test_bf16_weights_float32_coefficients():
    x, scales, weights, _, _ = _inputs(torch.float32, bias=False)
    scales = scales.detach().requires_grad_(True)
    out = merged_linear(x.detach().bfloat16(), scales, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert scales.grad is not None and scales.grad.dtype == torch.float32
    reference = naive_merged_linear(x.detach(), scales.detach(), weights.bfloat16().float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_does_not_save_the_merged_weight():
    """Autograd keeps only x, the scales and the store: nothing of shape out×in beyond it."""
    x, scales, weights, _, _ = _inputs(torch.float32, n=2, out=7, inp=6, bias=False)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        merged_linear(x, scales, weights)

    def merged_sized(t: torch.Tensor) -> bool:
        return t.dim() == 2 and sorted(t.shape) == [6, 7]

    assert not any(merged_sized(t) for t in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_merged_linear(x, scales, weights)
    assert any(merged_sized(t) for t in saved)  # the reference formulation does save it


def test_rejects_mismatched_scales():
    x, scales, weights, _, _ = _inputs(torch.float32, bias=False)
    with pytest.raises(ValueError, match="do not fit"):
        merged_linear(x, scales[:, :2], weights)

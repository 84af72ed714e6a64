"""The merged linear layer as one custom autograd function.

``y = x · (Σ_m W_m · diag(s_m))ᵀ + Σ_m β_m · b_m``

Plain autograd would save the materialised merged weight for backward, once per layer per source
dataset per step: with N sources that is N extra model copies on top of the N weight copies the
merge needs anyway. Here backward *rebuilds* W from the weight store (which must stay resident for
the forward anyway), so nothing of size out×in is saved, and the forward costs one matmul per
layer whatever N is. The gradients are

- ``grad_x = g · W``
- ``grad_s_m = column-sums((gᵀx) ⊙ W_m)``  (G = gᵀx is formed once; out×in)
- ``grad_β_m = (Σ_tokens g) · b_m``

Coefficients are float32 whatever the weights' dtype: an Adam step of 1e-3 near 1/3 is below
bfloat16's resolution there and would silently vanish.
"""

from __future__ import annotations

from typing import Any

import torch


def accumulation_dtype(scales: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the coefficients are float64 (gradcheck)."""
    return torch.promote_types(scales.dtype, torch.float32)


def merge_weight(scales: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_m weights[m] · diag(scales[m])`` computed in float32.

    ``scales`` is (M, in) float32 and ``weights`` the (M, out, in) store in any float dtype.
    Accumulating one source at a time keeps the transient memory at two out×in tensors.
    """
    acc = accumulation_dtype(scales)
    merged = weights[0].to(acc) * scales[0]
    for m in range(1, weights.shape[0]):
        if weights.dtype == acc:
            merged.addcmul_(weights[m], scales[m])  # fused, no temporary
        else:
            merged.add_(weights[m].to(acc) * scales[m])
    return merged


def merge_bias(scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """``Σ_m scales[m] · biases[m]`` in float32 (``scales`` (M,), ``biases`` (M, out))."""
    return (biases.to(accumulation_dtype(scales)) * scales[:, None]).sum(0)


class MergedLinearFunction(torch.autograd.Function):
    """Autograd function behind :func:`merged_linear` (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scales: torch.Tensor,
        weights: torch.Tensor,
        bias_scales: torch.Tensor | None,
        biases: torch.Tensor | None,
    ) -> torch.Tensor:
        weight = merge_weight(scales, weights).to(x.dtype)
        bias = None
        if biases is not None and bias_scales is not None:
            bias = merge_bias(bias_scales, biases).to(x.dtype)
        out = torch.nn.functional.linear(x, weight, bias)
        # Only references: x (needed anyway), the small scales, and the resident weight store.
        ctx.save_for_backward(x, scales, weights, bias_scales, biases)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scales, weights, bias_scales, biases = ctx.saved_tensors
        need_x, need_scales, _, need_bias_scales, _ = ctx.needs_input_grad
        grad_x = grad_scales = grad_bias_scales = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_x:
            weight = merge_weight(scales, weights).to(grad_out.dtype)
            grad_x = (g2 @ weight).reshape(x.shape)
            del weight
        if need_scales:
            x2 = x.reshape(-1, x.shape[-1])
            acc = accumulation_dtype(scales)
            outer = (g2.transpose(0, 1) @ x2).to(acc)  # G = gᵀx, out × in, formed once
            grad_scales = torch.stack(
                [(outer * weights[m]).sum(0, dtype=acc) for m in range(len(weights))]
            ).to(scales.dtype)
        if need_bias_scales and biases is not None:
            acc = accumulation_dtype(bias_scales)
            grad_bias_scales = (biases.to(acc) @ g2.sum(0, dtype=acc)).to(bias_scales.dtype)
        return grad_x, grad_scales, None, grad_bias_scales, None


def merged_linear(
    x: torch.Tensor,
    scales: torch.Tensor,
    weights: torch.Tensor,
    bias_scales: torch.Tensor | None = None,
    biases: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the merged linear layer without saving the merged weight.

    Args:
        x: (..., in) activations in the compute dtype.
        scales: (M, in) per-source, per-input-column scales (float32; expand coarser
            granularities before calling, autograd sums the gradient back).
        weights: (M, out, in) stacked source weights (buffers; never receive a gradient).
        bias_scales: (M,) one scale per source for the bias, or None.
        biases: (M, out) stacked source biases, or None.
    """
    if weights.dim() != 3 or scales.shape != (weights.shape[0], weights.shape[2]):
        raise ValueError(
            f"scales {tuple(scales.shape)} do not fit weights {tuple(weights.shape)} "
            "(expected (M, in) for (M, out, in))"
        )
    return MergedLinearFunction.apply(x, scales, weights, bias_scales, biases)


def naive_merged_linear(
    x: torch.Tensor,
    scales: torch.Tensor,
    weights: torch.Tensor,
    bias_scales: torch.Tensor | None = None,
    biases: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same function written with plain autograd (the reference formulation; for tests)."""
    weight = (weights.to(scales.dtype) * scales[:, None, :]).sum(0).to(x.dtype)
    bias = None
    if biases is not None and bias_scales is not None:
        bias = (biases.to(bias_scales.dtype) * bias_scales[:, None]).sum(0).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)

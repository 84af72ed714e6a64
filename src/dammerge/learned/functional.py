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

With layer streaming (:mod:`dammerge.learned.offload`) the store is not kept for backward at
all: the caller passes ``refetch``, which brings the store back to the compute device when the
backward of that layer runs, so a streamed layer's weights are resident only while it computes.

Coefficients are float32 whatever the weights' dtype: an Adam step of 1e-3 near 1/3 is below
bfloat16's resolution there and would silently vanish.

The two passes over the store (the merged weight, in forward and again in backward, and the
column gradients) are done by a :class:`StorePasses` object: :data:`EAGER` here, written with
plain torch operations (on CPU, into reused scratch buffers and a block of rows at a time), or
the compiled passes of :mod:`dammerge.learned.kernels`, each one fused pass over the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

StoreFetch = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
"""Returns a layer's (weights, biases) stores on the compute device, fetching them if needed."""


def accumulation_dtype(scales: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the coefficients are float64 (gradcheck)."""
    return torch.promote_types(scales.dtype, torch.float32)


class _Scratch:
    """Reusable CPU work buffers, one per role, grown to the largest layer seen.

    On CPU every fresh tensor above glibc's mmap threshold (32 MiB: an ``lm_head`` of a 32k
    vocabulary at hidden 256 already is one) is a new mapping whose pages the kernel faults in
    and zeroes, on every call: that cost as much as the arithmetic it served. The merged weight,
    ``G = gᵀx`` and the column-sum product live only inside one call of the function below, so
    one buffer per role serves every layer in turn. CUDA's caching allocator already reuses
    memory, so there nothing is kept.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(
        self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        if device.type != "cpu":
            return None
        numel = math.prod(shape)
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[(role, dtype)] = buffer
        return buffer[:numel].view(shape)


_SCRATCH = _Scratch()


def merge_weight(
    scales: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ_m weights[m] · diag(scales[m])`` computed in float32 (into ``out`` when given).

    ``scales`` is (M, in) float32 and ``weights`` the (M, out, in) store in any float dtype.
    Accumulating one source at a time keeps the transient memory at two out×in tensors.
    """
    acc = accumulation_dtype(scales)
    if out is None:
        merged = weights[0].to(acc) * scales[0]
    else:
        merged = torch.mul(weights[0], scales[0], out=out)
    for m in range(1, weights.shape[0]):
        if weights.dtype == acc:
            merged.addcmul_(weights[m], scales[m])  # fused, no temporary
        else:
            merged.add_(weights[m].to(acc) * scales[m])
    return merged


def merge_bias(scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """``Σ_m scales[m] · biases[m]`` in float32 (``scales`` (M,), ``biases`` (M, out))."""
    return (biases.to(accumulation_dtype(scales)) * scales[:, None]).sum(0)


def _merged_for(scales: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The merged weight in ``dtype`` for one matmul (in the scratch buffer on CPU)."""
    acc = accumulation_dtype(scales)
    out = _SCRATCH.get("merged", tuple(weights.shape[1:]), acc, weights.device)
    return merge_weight(scales, weights, out=out).to(dtype)


COLUMN_GRAD_BLOCK = 1 << 20  # elements of G formed at a time on CPU (4 MiB of float32)


def _column_grads(
    g2: torch.Tensor, x2: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``grad_s_m = column-sums(G ⊙ W_m)`` with ``G = gᵀx``, formed once per block of rows.

    On CPU, G is formed a block of output rows at a time (each block one matmul), and the N
    products with that block of every W_m are summed while the block is still in cache:
    neither G nor a product is ever written to main memory whole.
    """
    acc = accumulation_dtype(scales)
    out_features, in_features = weights.shape[1], weights.shape[2]
    rows = out_features
    if g2.device.type == "cpu":
        rows = max(1, min(out_features, COLUMN_GRAD_BLOCK // max(in_features, 1)))
    outer_buffer = _SCRATCH.get("outer", (rows, in_features), g2.dtype, g2.device)
    product = _SCRATCH.get("product", (rows, in_features), acc, g2.device)
    grads = torch.zeros(scales.shape, dtype=acc, device=scales.device)
    g_t = g2.transpose(0, 1)
    for start in range(0, out_features, rows):
        block = slice(start, min(start + rows, out_features))
        n = block.stop - block.start
        if outer_buffer is None:
            outer = (g_t[block] @ x2).to(acc)
        else:
            outer = torch.mm(g_t[block], x2, out=outer_buffer[:n]).to(acc)
        for m in range(len(weights)):
            if product is None:
                grads[m] += (outer * weights[m, block]).sum(0, dtype=acc)
            else:
                grads[m] += torch.mul(outer, weights[m, block], out=product[:n]).sum(0, dtype=acc)
    return grads.to(scales.dtype)


class StorePasses:
    """The merged linear function's passes over a weight store, with plain torch operations.

    On a CPU these are cache-conscious (scratch buffers; ``G`` a block of rows at a time); on a
    GPU each is about N elementwise kernels per layer with float32 temporaries between them,
    which :class:`dammerge.learned.kernels.CompiledPasses` fuses.
    """

    name = "eager"

    def merged(
        self, scales: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """``Σ_m weights[m] · diag(scales[m])`` accumulated in float32, returned in ``dtype``."""
        return _merged_for(scales, weights, dtype)

    def column_grads(
        self, g2: torch.Tensor, x2: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """``grad_s_m = column-sums((g2ᵀ x2) ⊙ W_m)`` for every m, in the scales' dtype."""
        return _column_grads(g2, x2, scales, weights)

    def linear(
        self,
        x: torch.Tensor,
        scales: torch.Tensor,
        weights: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """The layer's forward: ``x · merged(scales, weights)ᵀ + bias``."""
        return torch.nn.functional.linear(x, self.merged(scales, weights, x.dtype), bias)

    def backward(
        self,
        g2: torch.Tensor,
        x2: torch.Tensor,
        scales: torch.Tensor,
        weights: torch.Tensor,
        need_x: bool,
        need_scales: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's backward: ``(g2 · merged, column_grads)``, each None when not needed
        (the merged weight is freed before ``G`` is formed)."""
        grad_x = g2 @ self.merged(scales, weights, g2.dtype) if need_x else None
        grad_scales = self.column_grads(g2, x2, scales, weights) if need_scales else None
        return grad_x, grad_scales


EAGER = StorePasses()


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
        refetch: StoreFetch | None,
        passes: StorePasses,
    ) -> torch.Tensor:
        bias = None
        if biases is not None and bias_scales is not None:
            bias = merge_bias(bias_scales, biases).to(x.dtype)
        out = passes.linear(x, scales, weights, bias)
        # Only references: x (needed anyway), the small scales, and the resident weight store
        # (or, when streamed, not even the store: backward fetches it again).
        ctx.refetch = refetch
        ctx.passes = passes
        if refetch is None:
            ctx.save_for_backward(x, scales, weights, bias_scales, biases)
        else:
            ctx.save_for_backward(x, scales, bias_scales)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.refetch is None:
            x, scales, weights, bias_scales, biases = ctx.saved_tensors
        else:
            x, scales, bias_scales = ctx.saved_tensors
            weights, biases = ctx.refetch()
        need_x, need_scales, _, need_bias_scales, _, _, _ = ctx.needs_input_grad
        grad_bias_scales = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x, grad_scales = ctx.passes.backward(g2, x2, scales, weights, need_x, need_scales)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        if need_bias_scales and biases is not None:
            acc = accumulation_dtype(bias_scales)
            grad_bias_scales = (biases.to(acc) @ g2.sum(0, dtype=acc)).to(bias_scales.dtype)
        return grad_x, grad_scales, None, grad_bias_scales, None, None, None


def merged_linear(
    x: torch.Tensor,
    scales: torch.Tensor,
    weights: torch.Tensor,
    bias_scales: torch.Tensor | None = None,
    biases: torch.Tensor | None = None,
    *,
    refetch: StoreFetch | None = None,
    passes: StorePasses = EAGER,
) -> torch.Tensor:
    """Apply the merged linear layer without saving the merged weight.

    Args:
        x: (..., in) activations in the compute dtype.
        scales: (M, in) per-source, per-input-column scales (float32; expand coarser
            granularities before calling, autograd sums the gradient back).
        weights: (M, out, in) stacked source weights (frozen parameters; never receive a gradient).
        bias_scales: (M,) one scale per source for the bias, or None.
        biases: (M, out) stacked source biases, or None.
        refetch: when given, the stores are not kept for backward; backward calls it to get
            ``(weights, biases)`` back on the compute device (layer streaming).
        passes: how the store is read: :data:`EAGER`, or compiled passes from
            :func:`dammerge.learned.kernels.store_passes` (the same values within float
            rounding).
    """
    if weights.dim() != 3 or scales.shape != (weights.shape[0], weights.shape[2]):
        raise ValueError(
            f"scales {tuple(scales.shape)} do not fit weights {tuple(weights.shape)} "
            "(expected (M, in) for (M, out, in))"
        )
    return MergedLinearFunction.apply(x, scales, weights, bias_scales, biases, refetch, passes)


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

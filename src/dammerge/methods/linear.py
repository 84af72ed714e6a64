"""The linear kernel: a weighted sum of whole tensors (Model Soups)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """Weighted sum (or weighted average) of tensors.

    Args:
        tensors: ``W_1 .. W_N``, one shape and dtype.
        weights: ``w_1 .. w_N``.
        normalize: divide by ``Σ_i w_i`` (a true average).

    Returns:
        ``Σ_i w_i W_i`` (``/ Σ_i w_i`` when ``normalize``), in the tensors' dtype, summed into
        one output buffer (never a stack of N copies).

    Raises:
        ValueError: ``normalize`` with weights summing to (nearly) zero.
    """
    merged = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights, strict=True):
        merged.add_(tensor, alpha=weight)
    if normalize:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
        merged.div_(total)
    return merged

"""Two-model kernels that move the base toward one other model entry by entry: NearSwap (by
how close the two entries already are) and Arcee Fusion (where the change matters most)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dammerge.methods.sparsify import kth_smallest

NEARSWAP_MIN_DISTANCE = 1e-6  # distances below it count as it: no division by zero
FUSION_SOFTMAX_EPS = 1e-8  # added to both distributions so the KL divergence stays finite
FENCE_FACTOR = 1.5  # Tukey's upper fence: median + 1.5 × interquartile range


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """NearSwap (alchemonaut): interpolate toward the other model where the two are close.

    Args:
        t: the distance scale (``t ≥ 0``).
        base: the base tensor ``a``.
        other: the other model's tensor ``b``.

    Returns:
        ``w b + (1 − w) a`` with ``w = clamp(t / max(|a − b|, 1e-6), 0, 1)`` entry by entry:
        each entry moves toward ``b`` by ``min(t, |a − b|)``, so entries closer than ``t``
        take ``b``'s value and distant ones barely move.
    """
    weight = (t / (base - other).abs().clamp(min=NEARSWAP_MIN_DISTANCE)).clamp(0.0, 1.0)
    return weight * other + (1 - weight) * base


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance of each entry's change.

    Args:
        base: the base tensor ``B``.
        other: the other model's tensor ``W``.

    Returns:
        ``|W − B| · KL(p ‖ q)`` where ``p`` and ``q`` are the softmax distributions of the
        row of ``W`` and of ``B`` the entry lies in (rows along the last dimension; a 1-D
        tensor is one row), each plus 1e-8: a change counts more where it moves the row's
        distribution more.
    """
    p = F.softmax(other, dim=-1) + FUSION_SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + FUSION_SOFTMAX_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * divergence


def order_statistic(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``⌊fraction · (n − 1)⌋``-th smallest of ``values`` (0-based; ``n`` entries): the
    "lower" quantile at ``fraction``, computed exactly over all entries."""
    flat = values.reshape(-1)
    index = int(fraction * (flat.numel() - 1))
    return kth_smallest(flat, index + 1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion (mergekit 0.1): keep the base except where the other model's change is an
    outlier in importance.

    Args:
        base: the base tensor ``B``.
        other: the other model's tensor ``W``.

    Returns:
        ``B + (W − B)``, computed in the tensors' dtype, where :func:`fusion_importance` is at
        least the upper fence ``Q2 + 1.5 (Q3 − Q1)`` of all the tensor's importances
        (quartiles by :func:`order_statistic`); ``B`` elsewhere. The base plus the whole
        change is mergekit's arithmetic, and its bits: it is ``W`` exactly wherever ``W`` is
        within a factor of 2 of ``B`` (same sign), as a fine-tune's entries are; for unrelated
        tensors it rounds at ``B``'s scale.
    """
    importance = fusion_importance(base, other)
    q1, median, q3 = (order_statistic(importance, f) for f in (0.25, 0.5, 0.75))
    threshold = median + FENCE_FACTOR * (q3 - q1)
    return torch.where(importance >= threshold, base + (other - base), base)

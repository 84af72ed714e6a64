"""The SLERP kernels: spherical interpolation between two tensors (SLERP, NuSLERP)."""

from __future__ import annotations

import torch

DOT_THRESHOLD = 0.9995


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Linear interpolation ``(1 − t) v0 + t v1``."""
    return (1 - t) * v0 + t * v1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) of two tensors read as flat vectors.

    Args:
        t: the position, ``0`` gives ``v0`` and ``1`` gives ``v1``.
        v0: the start tensor (the base in a merge).
        v1: the end tensor.
        eps: norms below it make the directions undefined; :func:`lerp` is used.

    Returns:
        ``sin((1 − t) θ)/sin θ · v0 + sin(t θ)/sin θ · v1`` with ``cos θ`` the cosine of the
        two tensors; :func:`lerp` when either norm is below ``eps`` or the tensors are
        (anti-)parallel (``|cos θ| > 0.9995``), where the sphere degenerates (as mergekit does).
    """
    n0, n1 = v0.norm(), v1.norm()
    if n0 < eps or n1 < eps:
        return lerp(t, v0, v1)
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1.0, 1.0)
    if abs(float(dot)) > DOT_THRESHOLD:
        return lerp(t, v0, v1)
    # the coefficients in the tensors' own dtype, as every other step (and as mergekit):
    # where the two terms nearly cancel, a coefficient rounded differently moves the sum by
    # many units in its last place
    position = torch.tensor(t, dtype=dot.dtype)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    s0 = torch.sin((1 - position) * theta) / sin_theta
    s1 = torch.sin(position * theta) / sin_theta
    return s0 * v0 + s1 * v1


def interpolation_position(w0: float, w1: float) -> float:
    """NuSLERP's ``t`` from the two models' recipe weights.

    Returns:
        ``w1 / (w0 + w1)``, the second model's share; ``0.5`` when ``|w0 + w1| < 1e-6``.
    """
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    flatten: bool = True,
    row_wise: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """NuSLERP (mergekit): spherical interpolation of whole tensors or of each of their vectors.

    Args:
        t: the position, ``0`` gives ``v0`` and ``1`` gives ``v1``.
        v0: the first tensor (a task vector when the recipe has a base).
        v1: the second tensor, same shape.
        flatten: interpolate the tensors as two flat vectors; else vector by vector.
        row_wise: without ``flatten``, the vectors are the slices along the first dimension
            (``W[:, j]`` of a matrix) instead of the last (``W[i, :]``), as mergekit's
            ``nuslerp_row_wise`` reads.
        eps: pairs with ``1 − cos²θ ≤ eps²`` count as (anti-)parallel.

    Returns:
        For each pair of vectors ``a, b``: ``(sin((1 − t) θ) a + sin(t θ) b) / sin θ`` with
        ``cos θ = â · b̂`` (``â = a / max(‖a‖, 1e-7)``), or ``(1 − t) a + t b`` where the pair
        is (anti-)parallel. Unlike :func:`slerp` there is no 0.9995 threshold: only pairs
        parallel to rounding precision fall back to the line (an antiparallel pair whose
        computed cosine is not exactly −1 has no defined geodesic and gives large values, as
        in mergekit).
    """
    if flatten:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        # the first axis swapped with the last, as mergekit does: moving it last instead takes
        # the same vectors, but on three or more dimensions the intermediate results get
        # another memory layout, which makes torch sum the cosines' terms in another order
        # (float32 results a few ulp apart, many more where the two terms of the result cancel)
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    parallel = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, 0.0, cos))  # π/2 on the unused branch: no 0/0
    curved = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    result = torch.where(parallel, (1 - t) * a + t * b, curved)
    if flatten:
        return result.reshape(v0.shape)
    return result.transpose(0, -1) if row_wise else result

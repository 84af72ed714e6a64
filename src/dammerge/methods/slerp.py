"""The SLERP kernel: spherical interpolation between two tensors."""

from __future__ import annotations

import math

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
    dot = float(((v0 / n0) * (v1 / n1)).sum().clamp(-1.0, 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return lerp(t, v0, v1)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin((1 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return s0 * v0 + s1 * v1

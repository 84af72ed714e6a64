"""Means of several tensors on the unit sphere: Multi-SLERP and the Karcher mean.

Both read each tensor as a flat vector ``x_i = n_i u_i`` (norm ``n_i``, direction ``u_i``),
average the directions on the sphere and give the result the weighted mean norm. They differ
in how the mean direction is found: Multi-SLERP in one step from the normalised chordal mean,
the Karcher mean by Riemannian gradient descent to the point that minimises the weighted sum
of squared geodesic distances.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multi-SLERP (Goddard): barycentric interpolation of N tensors on the sphere.

    Args:
        tensors: ``x_1 .. x_N``, one shape (task vectors when the recipe has a base).
        weights: ``w_1 .. w_N``.
        normalize_weights: divide the weights by their sum first.
        eps: added to each norm before dividing by it, and to the tangent step's length;
            a chordal mean shorter than it has no direction.

    Returns:
        ``x_1`` for one tensor. Else, with ``u_i = x_i / (n_i + eps)``, the chordal mean
        ``S = Σ w_i u_i`` and its direction ``m = S / ‖S‖``: the exponential map at ``m`` of
        ``T = Σ w_i (u_i − (u_i·m) m)``, the weighted mean of the directions projected on the
        tangent space at ``m``, scaled by ``Σ w_i n_i``:
        ``(Σ w_i n_i) (cos(τ) m + sin(τ) T / τ)`` with ``τ = ‖T‖ + eps``. In exact arithmetic
        ``T = S − (S·m) m = 0``, so the result is ``m`` scaled by the weighted mean norm
        (times ``cos(eps)``, 1 in float for any small ``eps``). For two tensors whose ``S``
        vanishes (opposite directions, equal weights): ``w_1 x_1 + w_2 x_2``.

    Raises:
        ValueError: ``‖S‖ < eps`` with more than two tensors, or weights that sum to zero
            with ``normalize_weights``.
    """
    if len(tensors) == 1:
        return tensors[0]
    # the weights as tensors of the inputs' dtype, normalised there, and each weighted term
    # rounded before it is added (no fused multiply-add): mergekit's float32 arithmetic step
    # by step, so that entries where the terms nearly cancel round alike
    w = torch.tensor([float(v) for v in weights], dtype=tensors[0].dtype)
    if normalize_weights:
        if sum(float(v) for v in weights) == 0:
            raise ValueError("multislerp with normalize_weights needs weights that do not sum to 0")
        w = w / w.sum()
    norms = [x.norm() for x in tensors]
    chordal = torch.zeros_like(tensors[0])
    for x, n, weight in zip(tensors, norms, w, strict=True):
        chordal += (x / (n + eps)) * weight
    length = chordal.norm()
    if length < eps:
        if len(tensors) == 2:
            return w[0] * tensors[0] + w[1] * tensors[1]
        raise ValueError(
            "the weighted directions cancel out (opposite tensors with balancing weights); "
            "choose other weights"
        )
    mean = chordal.div_(length)
    tangent = torch.zeros_like(mean)
    for x, n, weight in zip(tensors, norms, w, strict=True):
        unit = x / (n + eps)
        tangent += unit.sub_(mean * (unit * mean).sum()) * weight
    step = tangent.norm() + eps
    direction = mean * torch.cos(step) + tangent * (torch.sin(step) / step)
    return direction * (torch.stack(norms) * w).sum()


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """The weighted Karcher (Fréchet) mean of the tensors' directions, at their mean norm.

    Args:
        tensors: ``x_1 .. x_N``, one shape.
        weights: ``α_1 .. α_N`` (default ``1/N`` each, mergekit's ``karcher``).
        max_iter: the most gradient steps taken.
        tol: the step length below which the descent stops; also the norm at or below which
            a tensor has no direction, and the angle below which a direction already agrees
            with the mean.

    Returns:
        ``x_1`` for one tensor. Else ``(Σ_i α_i n_i) μ`` with ``n_i = ‖x_i‖`` and ``μ`` the unit
        vector minimising ``Σ_i α̂_i θ_i²``, ``θ_i = arccos(μ · u_i)`` the geodesic distance to
        the direction ``u_i = x_i / n_i``, over the tensors with ``n_i > tol`` (their weights
        renormalised to ``α̂``; if there are none, zeros). The descent starts from the
        normalised chordal mean ``Σ α̂_i u_i`` (``u`` of the first such tensor when that is
        shorter than ``tol``) and moves ``μ`` along the geodesic by the gradient step
        ``T = Σ_i α̂_i (θ_i / sin θ_i)(u_i − cos θ_i μ)`` (terms with ``θ_i < tol`` left out):
        ``μ ← cos‖T‖ μ + sin‖T‖ T/‖T‖``, renormalised, until ``‖T‖ < tol``.
    """
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors) if weights is None else [float(a) for a in weights]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    kept = [(a, x / n) for a, x, n in zip(alphas, tensors, norms, strict=True) if float(n) > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    total = sum(a for a, _ in kept)
    points = [(a / total, unit) for a, unit in kept]
    mean = _start(points, tol)
    for _ in range(max_iter):
        step = _gradient_step(mean, points, tol)
        length = torch.linalg.vector_norm(step)
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)
        mean_norm = torch.linalg.vector_norm(mean)
        if float(mean_norm) > tol:
            mean = mean / mean_norm
    return scale * mean


def _start(points: list[tuple[float, torch.Tensor]], tol: float) -> torch.Tensor:
    """The normalised chordal mean ``Σ α̂_i u_i``, or the first direction when it is too short."""
    chordal = torch.zeros_like(points[0][1])
    for alpha, unit in points:
        chordal += alpha * unit
    length = torch.linalg.vector_norm(chordal)
    return points[0][1].clone() if float(length) < tol else chordal / length


def _gradient_step(
    mean: torch.Tensor, points: list[tuple[float, torch.Tensor]], tol: float
) -> torch.Tensor:
    """``Σ_i α̂_i log_μ(u_i)``, the weighted mean of the log maps ``θ/sin θ (u − cos θ μ)``."""
    step = torch.zeros_like(mean)
    for alpha, unit in points:
        cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
        theta = torch.arccos(cos)
        if float(theta) < tol:
            continue
        step += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
    return step

"""SLERP: spherical interpolation between the base and one other model, per tensor.

``t = 0`` gives the base, ``t = 1`` the other model. Directions are taken from the tensors
normalised as flat vectors; when they are (anti-)parallel (``|cos| > 0.9995``) the sphere
degenerates and plain linear interpolation is used instead, as mergekit does.
"""

from __future__ import annotations

import math

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod

DOT_THRESHOLD = 0.9995


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1 - t) * v0 + t * v1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
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


def _run(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    return slerp(float(inputs.params["t"]), inputs.base, inputs.tensors[0])


METHOD = MergeMethod(
    name="slerp",
    summary="spherical interpolation between base (t=0) and one other model (t=1)",
    run=_run,
    global_params={"t": REQUIRED},
    requires_base=True,
    min_models=1,
    max_models=1,
)

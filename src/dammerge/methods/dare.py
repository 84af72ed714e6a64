"""DARE (Yu et al. 2024): randomly drop task-vector entries and rescale the rest, then add
(``dare_linear``) or TIES-combine with sign election (``dare_ties``).

Rescaling differs between the paper and mergekit: the paper divides kept entries by the keep
probability ``density``; mergekit (>= 0.1) rescales so the L1 norm of each task vector is
unchanged. ``rescale_mode: l1`` (default, mergekit) or ``rescale_mode: density`` (paper);
``rescale: false`` turns rescaling off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod
from dammerge.methods.sparsify import RescaleMode, random_drop
from dammerge.methods.task_arithmetic import combine_task_vectors


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    consensus: bool,
    generator: torch.Generator | None = None,
    rescale: RescaleMode = "l1",
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    deltas = [
        random_drop(t - base, d, generator, rescale)
        for t, d in zip(tensors, densities, strict=True)
    ]
    return combine_task_vectors(
        base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def rescale_mode(params: dict) -> RescaleMode:
    if not params.get("rescale", True):
        return "none"
    mode = str(params.get("rescale_mode", "l1"))
    if mode not in ("l1", "density"):
        raise ValueError(f"rescale_mode must be 'l1' or 'density', got {mode!r}")
    return mode  # type: ignore[return-value]


def _runner(consensus: bool):
    def run(inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None
        return dare(
            inputs.base,
            inputs.tensors,
            [float(p["weight"]) for p in inputs.model_params],
            [float(p["density"]) for p in inputs.model_params],
            consensus=consensus,
            generator=inputs.generator,
            rescale=rescale_mode(inputs.params),
            normalize=bool(inputs.params["normalize"]),
            lambda_=float(inputs.params["lambda"]),
        )

    return run


_GLOBALS = {
    "normalize": False,
    "lambda": 1.0,
    "rescale": True,
    "rescale_mode": "l1",
    "int8_mask": False,  # a memory option of mergekit's, accepted for its recipes; no effect
}

DARE_LINEAR = MergeMethod(
    name="dare_linear",
    summary="random drop + rescale of task vectors, then weighted sum",
    run=_runner(consensus=False),
    model_params={"weight": REQUIRED, "density": 1.0},
    global_params=dict(_GLOBALS),
    requires_base=True,
    stochastic=True,
)

DARE_TIES = MergeMethod(
    name="dare_ties",
    summary="random drop + rescale of task vectors, then TIES sign election",
    run=_runner(consensus=True),
    model_params={"weight": REQUIRED, "density": 1.0},
    global_params=dict(_GLOBALS),
    requires_base=True,
    stochastic=True,
)

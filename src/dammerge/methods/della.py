"""DELLA (Deep et al. 2024): MagPrune — drop task-vector entries at random with keep
probabilities that grow with magnitude rank (``density ± epsilon``, per row), rescale what is
kept, then TIES-combine (``della``) or add (``della_linear``).

Rescaling differs between the paper and mergekit: the paper divides each kept entry by its own
keep probability (``rescale_mode: probability``); mergekit (>= 0.1) rescales so the L1 norm of
each task vector is unchanged (``rescale_mode: l1``, the default). ``rescale: false`` turns
rescaling off. ``epsilon`` defaults to 0.15 and ``density`` 0 gives an empty task vector, as in
mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod
from dammerge.methods.sparsify import DellaRescaleMode, magnitude_ranked_drop
from dammerge.methods.task_arithmetic import combine_task_vectors


def della(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    *,
    consensus: bool = True,
    generator: torch.Generator | None = None,
    rescale: bool = True,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale_mode: DellaRescaleMode = "l1",
) -> torch.Tensor:
    deltas = [
        magnitude_ranked_drop(t - base, d, e, generator, rescale, rescale_mode)
        for t, d, e in zip(tensors, densities, epsilons, strict=True)
    ]
    return combine_task_vectors(
        base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def _runner(consensus: bool):
    def run(inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None
        return della(
            inputs.base,
            inputs.tensors,
            [float(p["weight"]) for p in inputs.model_params],
            [float(p["density"]) for p in inputs.model_params],
            [float(p["epsilon"]) for p in inputs.model_params],
            consensus=consensus,
            generator=inputs.generator,
            rescale=bool(inputs.params["rescale"]),
            normalize=bool(inputs.params["normalize"]),
            lambda_=float(inputs.params["lambda"]),
            rescale_mode=str(inputs.params["rescale_mode"]),  # type: ignore[arg-type]
        )

    return run


DELLA = MergeMethod(
    name="della",
    summary="magnitude-ranked random drop (MagPrune), then TIES sign election",
    run=_runner(consensus=True),
    model_params={"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
    global_params={
        "normalize": True,
        "lambda": 1.0,
        "rescale": True,
        "rescale_mode": "l1",
        "int8_mask": False,
    },
    requires_base=True,
    stochastic=True,
)

DELLA_LINEAR = MergeMethod(
    name="della_linear",
    summary="magnitude-ranked random drop (MagPrune), then weighted sum",
    run=_runner(consensus=False),
    model_params={"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
    global_params={
        "normalize": False,
        "lambda": 1.0,
        "rescale": True,
        "rescale_mode": "l1",
        "int8_mask": False,
    },
    requires_base=True,
    stochastic=True,
)

"""Model Breadcrumbs (Davari & Belilovsky 2023): drop both the tiny entries and the largest
outliers of each task vector, keeping a magnitude band; optionally with TIES sign election.

As in mergekit, ``rescale: true`` (default false) scales each sparsified task vector back to its
L1 norm, and ``int8_mask`` is accepted and has no effect here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod
from dammerge.methods.sparsify import magnitude_band, rescale_kept
from dammerge.methods.task_arithmetic import combine_task_vectors


def breadcrumbs(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
) -> torch.Tensor:
    deltas = []
    for t, d, g in zip(tensors, densities, gammas, strict=True):
        delta = t - base
        kept = magnitude_band(delta, d, g)
        deltas.append(rescale_kept(delta, kept, d, "l1") if rescale else kept)
    return combine_task_vectors(
        base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def _runner(consensus: bool):
    def run(inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None
        return breadcrumbs(
            inputs.base,
            inputs.tensors,
            [float(p["weight"]) for p in inputs.model_params],
            [float(p["density"]) for p in inputs.model_params],
            [float(p["gamma"]) for p in inputs.model_params],
            consensus=consensus,
            normalize=bool(inputs.params["normalize"]),
            lambda_=float(inputs.params["lambda"]),
            rescale=bool(inputs.params["rescale"]),
        )

    return run


BREADCRUMBS = MergeMethod(
    name="breadcrumbs",
    summary="keep a magnitude band of each task vector (drop outliers and small entries)",
    run=_runner(consensus=False),
    model_params={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
    global_params={"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False},
    requires_base=True,
)

BREADCRUMBS_TIES = MergeMethod(
    name="breadcrumbs_ties",
    summary="breadcrumbs sparsification, then TIES sign election",
    run=_runner(consensus=True),
    model_params={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
    global_params={"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False},
    requires_base=True,
)

"""TIES-merging (Yadav et al. 2023): trim each task vector to its largest entries, elect a sign
per entry, and average only the agreeing entries (disjoint mean).

As in mergekit, ``rescale: true`` (default false) scales each trimmed task vector back to its
L1 norm, and ``int8_mask`` (a memory option of mergekit) is accepted and has no effect here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod
from dammerge.methods.sparsify import magnitude_prune, rescale_kept
from dammerge.methods.task_arithmetic import combine_task_vectors


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = False,
) -> torch.Tensor:
    deltas = []
    for t, d in zip(tensors, densities, strict=True):
        delta = t - base
        kept = magnitude_prune(delta, d)
        deltas.append(rescale_kept(delta, kept, d, "l1") if rescale else kept)
        del delta, kept  # not alive during the next model's selection or the combine
    return combine_task_vectors(
        base, deltas, weights, consensus=True, normalize=normalize, lambda_=lambda_
    )


def _run(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    return ties(
        inputs.base,
        inputs.tensors,
        METHOD.weights(inputs),
        [float(p["density"]) for p in inputs.model_params],
        normalize=bool(inputs.params["normalize"]),
        lambda_=float(inputs.params["lambda"]),
        rescale=bool(inputs.params["rescale"]),
    )


METHOD = MergeMethod(
    name="ties",
    summary="trim task vectors by magnitude, elect signs, disjoint mean",
    run=_run,
    model_params={"weight": REQUIRED, "density": 1.0},
    global_params={"normalize": True, "lambda": 1.0, "rescale": False, "int8_mask": False},
    requires_base=True,
)

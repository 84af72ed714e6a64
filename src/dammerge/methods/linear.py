"""Linear merge / Model Soups (Wortsman et al. 2022): a weighted average of the weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """``sum_i w_i W_i``, divided by ``sum_i w_i`` when ``normalize`` (a true average)."""
    merged = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights, strict=True):
        merged.add_(tensor, alpha=weight)  # one output buffer, never a stack of N copies
    if normalize:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
        merged.div_(total)
    return merged


def _run(inputs: MergeInputs) -> torch.Tensor:
    return linear(
        inputs.tensors, METHOD.weights(inputs), normalize=bool(inputs.params["normalize"])
    )


METHOD = MergeMethod(
    name="linear",
    summary="weighted average of all models (Model Soups with equal weights)",
    run=_run,
    model_params={"weight": REQUIRED},
    global_params={"normalize": True},
)

"""Task arithmetic (Ilharco et al. 2023): ``base + lambda * sum_i w_i (W_i - base)``.

:func:`combine_task_vectors` is also the final step of TIES, DARE, breadcrumbs and DELLA,
which only change how each task vector is sparsified and whether signs are elected first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod
from dammerge.methods.sparsify import sign_consensus


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Weighted sum of task vectors added to ``base`` (mergekit's generalized task arithmetic).

    With ``consensus`` only entries agreeing with the elected sign contribute, and
    ``normalize`` divides each entry by the sum of weights of the models that contributed to
    it (TIES' disjoint mean); without consensus it divides by the sum of all weights.
    """
    stacked = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if consensus:
        mask = sign_consensus(weighted)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    return combine_task_vectors(
        base, [t - base for t in tensors], weights, normalize=normalize, lambda_=lambda_
    )


def _run(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    return task_arithmetic(
        inputs.base,
        inputs.tensors,
        METHOD.weights(inputs),
        lambda_=float(inputs.params["lambda"]),
        normalize=bool(inputs.params["normalize"]),
    )


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="base + lambda * weighted sum of task vectors (W_i - base)",
    run=_run,
    model_params={"weight": REQUIRED},
    global_params={"lambda": 1.0, "normalize": False},
    requires_base=True,
)

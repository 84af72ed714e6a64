"""Task arithmetic (Ilharco et al. 2023): ``base + lambda * sum_i w_i (W_i - base)``.

:func:`combine_task_vectors` is also the final step of TIES, DARE, breadcrumbs and DELLA,
which only change how each task vector is sparsified and whether signs are elected first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod


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
    # Model by model into a few tensor-sized buffers, never a stack of N copies: the same
    # arithmetic as stacking (each w_i * delta_i rounded, then summed in model order), at a
    # fraction of the memory traffic and peak RSS of a merge.
    dtype = deltas[0].dtype
    w = torch.tensor(list(weights), dtype=dtype, device=deltas[0].device)
    scratch = torch.empty_like(deltas[0])
    mixed = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, w, strict=True):
        mixed.add_(torch.mul(delta, weight, out=scratch))
    if consensus:
        mixed = _disjoint_sum(mixed, deltas, w, scratch, normalize=normalize)
    elif normalize:
        total = w.sum()
        mixed.div_(torch.where(total.abs() < 1e-8, torch.ones_like(total), total))
    del scratch
    if lambda_ != 1.0:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def _disjoint_sum(
    mixed: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    w: torch.Tensor,
    scratch: torch.Tensor,
    *,
    normalize: bool,
) -> torch.Tensor:
    """TIES' elected-sign sum of the weighted task vectors (over the weights of the
    contributors when ``normalize``), given their plain sum ``mixed`` (overwritten).

    The elected sign is ``e = +1`` where ``mixed >= 0``, else ``-1`` (``copysign``: the sum
    starts from +0.0, so it is never -0.0). A term ``t = w_i * delta_i`` agrees when
    ``t * e > 0``, so the agreeing sum is ``e * Σ relu(t * e)``: bit for bit the sum of the
    agreeing terms (negation is exact), computed with float passes only. Boolean masks and
    mixed-dtype arithmetic ran several times slower per element on the CPU and were most of a
    TIES merge's time.
    """
    elected = torch.copysign(torch.ones_like(mixed), mixed)
    total = mixed.zero_()
    divisor = torch.zeros_like(mixed) if normalize else None
    indicator = torch.empty_like(mixed) if normalize else None
    for delta, weight in zip(deltas, w, strict=True):
        agreeing = torch.mul(delta, weight, out=scratch).mul_(elected).clamp_(min=0)
        total.add_(agreeing)
        if divisor is not None:
            # sign(relu(.)) is 1 exactly where the term agrees: += weight there
            divisor.add_(torch.sign(agreeing, out=indicator), alpha=float(weight))
    total.mul_(elected)
    if divisor is not None:
        total.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return total


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
    # rescale/int8_mask: accepted for mergekit recipes; nothing is dropped, so they change nothing
    global_params={"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False},
    requires_base=True,
)

"""Model Stock (Jang et al. 2024): interpolate between the average of the fine-tuned models and
the base, with a ratio set by the angle between their task vectors:
``t = N cos / (1 + (N - 1) cos)``, ``W = t * mean(W_i) + (1 - t) * base``.

``filter_wise: true`` measures the angle per row (output filter) instead of per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch

from dammerge.methods.base import MergeInputs, MergeMethod


def model_stock(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    shape = base.shape
    rowwise = filter_wise and base.dim() >= 2
    flat = (lambda x: x.reshape(shape[0], -1)) if rowwise else (lambda x: x.reshape(1, -1))
    w0 = flat(base)
    offsets = [flat(t) - w0 for t in tensors]
    cosines = []
    for a, b in combinations(offsets, 2):
        denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
        cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    ratio = n * cos / (1 + (n - 1) * cos)
    average = torch.stack([flat(t) for t in tensors]).mean(dim=0)
    return (ratio * average + (1 - ratio) * w0).reshape(shape)


def _run(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    return model_stock(inputs.base, inputs.tensors, filter_wise=bool(inputs.params["filter_wise"]))


METHOD = MergeMethod(
    name="model_stock",
    summary="average of fine-tuned models pulled toward the base by their task-vector angle",
    run=_run,
    global_params={"filter_wise": False},
    requires_base=True,
    min_models=2,
)

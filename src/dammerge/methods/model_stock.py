"""The Model Stock kernel: the fine-tunes' average pulled toward the base by their angle."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch

SINGULAR = 1e-6  # |1 + (N − 1) c| below it: no finite step, the base is kept (as mergekit)


def model_stock(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock (Jang et al. 2024).

    Args:
        base: the base tensor ``B``.
        tensors: the fine-tuned tensors ``W_1 .. W_N`` (``N >= 2``).
        filter_wise: measure the angle per vector along the last dimension (per row of a
            matrix: its output filter) instead of per tensor, as mergekit does; a tensor of
            three or more dimensions (a convolution's kernel) then has one angle per kernel
            row, not per output channel.

    Returns:
        ``t · mean_i(W_i) + (1 − t) · B`` with ``t = N c / (1 + (N − 1) c)``, ``c`` the mean
        cosine between the task vectors ``W_i − B`` over all pairs (norm products below
        1e-6 count as 1e-6). Where ``|1 + (N − 1) c| < 1e-6`` (task vectors that cancel)
        ``t`` is 0: the base, instead of an unbounded step.

    Raises:
        ValueError: fewer than two fine-tuned tensors.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    shape = base.shape
    per_vector = filter_wise and base.dim() >= 2  # else the whole tensor is one vector

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x if per_vector else x.reshape(1, -1)

    w0 = flat(base)
    offsets = [flat(t) - w0 for t in tensors]
    cosines = []
    for a, b in combinations(offsets, 2):
        denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
        cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    ratio = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    average = torch.stack([flat(t) for t in tensors]).mean(dim=0)
    return (ratio * average + (1 - ratio) * w0).reshape(shape)

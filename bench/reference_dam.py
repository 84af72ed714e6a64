"""A faithful re-implementation of the public DAM reference code's *formulation*, for benchmarks.

Written by us from the description in ``../shared/DESIGN.md`` (not copied): what matters here is
its cost structure, which is what ``bench/dam_step.py`` compares against.

- Every merged linear layer holds its own copy of the N source weights, and autograd saves the
  materialised merged weight ``Σ_i c_i ⊙ W_i`` of every layer for backward.
- Each training step runs one merged forward per source model (batch 1 per source), each
  keeping its own saved merged weights until the shared backward, and one forward of each
  teacher, a separate full copy of source model i.
- Coefficients are per model and per input column, squashed with tanh as the reference did,
  in the weights' dtype (the reference trained bf16 coefficients beside bf16 weights).

Together that is about 2N model copies resident plus N merged copies saved per step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceMergedLinear(nn.Module):
    """``y = x (Σ_i tanh(c_i) ⊙ W_i)ᵀ``, the merged weight built by autograd-tracked ops."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(w.detach().clone(), requires_grad=False) for w in weights
        )
        in_features, dtype, device = weights[0].shape[1], weights[0].dtype, weights[0].device
        start = torch.atanh(torch.tensor(1.0 / len(weights)))
        # in the weights' dtype, as the reference trained them (bf16 beside bf16 weights)
        self.coefficients = nn.ParameterList(
            nn.Parameter(torch.full((in_features,), float(start), dtype=dtype, device=device))
            for _ in weights
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = sum(
            torch.tanh(c) * w for c, w in zip(self.coefficients, self.weights, strict=True)
        )
        return F.linear(x, merged)


def build_reference_merge(sources: list[nn.Module]) -> nn.Module:
    """A copy of ``sources[0]`` whose linear layers are :class:`ReferenceMergedLinear` over all.

    Every ``nn.Linear`` is merged, an untied ``lm_head`` included, as our DAM does by default;
    embeddings and norms stay those of ``sources[0]``, frozen. Only the coefficients train.
    """
    merged = copy.deepcopy(sources[0])
    for p in merged.parameters():
        p.requires_grad_(False)
    named = [dict(s.named_modules()) for s in sources]
    for name, module in list(merged.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        layer = ReferenceMergedLinear([n[name].weight for n in named])
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name), child, layer)
    return merged


def reference_step(
    merged: nn.Module,
    teachers: list[nn.Module],
    batches: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    temperature: float = 2.0,
) -> float:
    """One step as the reference did it: N merged forwards, N teacher forwards, one backward."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for teacher, tokens in zip(teachers, batches, strict=True):
        with torch.no_grad():
            target = teacher(tokens).logits / temperature
        student = merged(tokens).logits / temperature
        kl = F.kl_div(
            F.log_softmax(student, -1).flatten(0, 1),
            F.log_softmax(target, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        total = total + kl * temperature**2
    total.backward()
    optimizer.step()
    return float(total.detach())

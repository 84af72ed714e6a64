"""The contract between the executor and a merge method.

A method is a small pure function over tensors (the *kernel*, easy to test against a
reference) plus a :class:`MergeMethod` record that says which parameters it takes, whether it
needs a base model, and how to call the kernel from resolved parameters. The executor never
knows a method by name; it reads this record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

REQUIRED = object()  # marker: a parameter without a default


@dataclass
class MergeInputs:
    """Everything a method sees for one output tensor.

    ``tensors`` holds the participating models' tensors in recipe order (for methods that use a
    base, the base is *not* among them and comes in ``base``), already in the compute dtype.
    ``model_params[i]`` are the per-model parameters of ``tensors[i]``, ``params`` the global
    ones, both resolved for this tensor (gradients interpolated, filters applied).
    """

    name: str
    tensors: Sequence[torch.Tensor]
    base: torch.Tensor | None
    model_params: Sequence[dict[str, Any]]
    params: dict[str, Any]
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    run: Callable[[MergeInputs], torch.Tensor]
    paper: str = ""  # where the method was published (a link)
    model_params: dict[str, Any] = field(default_factory=dict)
    global_params: dict[str, Any] = field(default_factory=dict)
    requires_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    stochastic: bool = False

    def weights(self, inputs: MergeInputs) -> list[float]:
        return [float(p["weight"]) for p in inputs.model_params]

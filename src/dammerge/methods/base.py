"""The contract between the executor and a merge method.

A method is composed of small pure functions over tensors (the *kernels*, each easy to test
against a reference) and described by a :class:`MergeMethod` record: which parameters it takes,
whether it needs a base model, and how to call its kernels from resolved parameters. The
executor never knows a method by name; it reads this record. The records themselves are built
in :mod:`dammerge.methods.catalogue`.
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
    """One data-free merge method as the planner and the executor see it.

    ``model_params`` / ``global_params`` map each recipe parameter to its default
    (:data:`REQUIRED` when it has none), in the order they are listed to users; ``paper`` is
    the address of the method's source (a paper, or the reference implementation).
    """

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
        """The per-model recipe ``weight`` of each input tensor."""
        return [float(p["weight"]) for p in inputs.model_params]

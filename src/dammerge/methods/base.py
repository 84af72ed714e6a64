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


@dataclass(frozen=True)
class ValueRange:
    """The values one recipe parameter may take, checked for every tensor before any compute.

    A number from ``low`` to ``high`` (``None``: unbounded on that side), ``low`` itself
    excluded when ``low_open``; ``integer`` asks for a whole number (``5`` or ``5.0``);
    ``flag`` asks for ``true`` or ``false`` instead of a number.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False
    flag: bool = False

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is one of the values this range allows."""
        if self.flag:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and float(value) != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        """What the range asks for, to end the sentence "it must be ..."."""
        if self.flag:
            return "true or false"
        kind = "a whole number" if self.integer else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:g}")
        return f"{kind} {' and '.join(bounds)}".strip()


FLAG = ValueRange(flag=True)
NON_NEGATIVE = ValueRange(low=0.0)
POSITIVE = ValueRange(low=0.0, low_open=True)
COUNT = ValueRange(low=0.0, integer=True)


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
    (:data:`REQUIRED` when it has none), in the order they are listed to users; ``ranges``
    gives the :class:`ValueRange` of those that have one (the planner checks every resolved
    value against it). ``paper`` is the address of the method's source (a paper, or the
    reference implementation).

    The base: ``requires_base`` methods get the recipe's ``base_model`` as ``base`` and refuse
    a recipe without one; ``optional_base`` ones get it when the recipe names one (nuslerp and
    multislerp then work on task vectors); ``base_joins_models`` ones take no base, and a
    ``base_model`` the recipe names is merged as one more model (as mergekit 0.1.5 does for
    ``karcher``). The model counts exclude a base handed over as ``base``.
    """

    name: str
    summary: str
    run: Callable[[MergeInputs], torch.Tensor]
    paper: str = ""  # where the method was published (a link)
    model_params: dict[str, Any] = field(default_factory=dict)
    global_params: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, ValueRange] = field(default_factory=dict)
    requires_base: bool = False
    optional_base: bool = False
    base_joins_models: bool = False
    min_models: int = 1
    max_models: int | None = None
    stochastic: bool = False

    @property
    def takes_base(self) -> bool:
        """Whether a recipe's ``base_model`` reaches the kernels as ``base``."""
        return self.requires_base or self.optional_base

    def weights(self, inputs: MergeInputs) -> list[float]:
        """The per-model recipe ``weight`` of each input tensor."""
        return [float(p["weight"]) for p in inputs.model_params]

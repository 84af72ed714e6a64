"""Data-free merge methods: pure kernels, composed by one catalogue, looked up by recipe name.

``sparsify``, ``combine``, ``linear``, ``slerp``, ``sphere``, ``model_stock``, ``selective``
and ``ram`` hold the kernels; :mod:`dammerge.methods.catalogue` binds them to recipe
parameters and builds :data:`METHODS`.
"""

from __future__ import annotations

from dammerge.errors import ConfigError
from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod
from dammerge.methods.catalogue import METHODS


def get_method(name: str) -> MergeMethod:
    """The method named ``name`` in a recipe's ``merge_method``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r}", f"choose one of: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["METHODS", "REQUIRED", "MergeInputs", "MergeMethod", "get_method"]

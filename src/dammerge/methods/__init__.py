"""Registry of data-free merge methods: one module per method, looked up by recipe name."""

from __future__ import annotations

from dammerge.errors import ConfigError
from dammerge.methods import (
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from dammerge.methods.base import REQUIRED, MergeInputs, MergeMethod

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        linear.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.DARE_LINEAR,
        dare.DARE_TIES,
        breadcrumbs.BREADCRUMBS,
        breadcrumbs.BREADCRUMBS_TIES,
        della.DELLA,
        della.DELLA_LINEAR,
        slerp.METHOD,
        model_stock.METHOD,
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r}", f"choose one of: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["METHODS", "REQUIRED", "MergeInputs", "MergeMethod", "get_method"]

"""Evolutionary merging (``merge_method: evolve``): CMA-ES over a data-free method's parameters.

The DAM paper's baseline (Akiba et al. 2024, parameter-space evolution): per layer group and
module group weights / densities (or slerp's ``t``) searched by CMA-ES from the ``cma`` package,
scored by a fitness on held-in representative data, candidates merged in memory, every
evaluation logged and resumable, and the best genome exported as an ordinary recipe plus its
checkpoint. Entry points: :func:`run_evolve_merge` (CLI) and :func:`evolve_merge` (Python,
accepts a custom fitness).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CallableFitness",
    "EvolveResult",
    "EvolveSettings",
    "Fitness",
    "FitnessContext",
    "FitnessValue",
    "KLFitness",
    "SearchSpace",
    "TaskFitness",
    "evolve_merge",
    "run_evolve_merge",
]


def __getattr__(name: str) -> Any:
    """The public names, imported on first use: reading an evolve recipe's settings (as the
    registry does for every merge) must not pull in transformers and the search machinery."""
    from dammerge.evolve.fitness import (
        CallableFitness,
        Fitness,
        FitnessContext,
        FitnessValue,
        KLFitness,
        TaskFitness,
    )
    from dammerge.evolve.run import EvolveResult, evolve_merge, run_evolve_merge
    from dammerge.evolve.settings import EvolveSettings
    from dammerge.evolve.space import SearchSpace

    exports = {
        "CallableFitness": CallableFitness,
        "EvolveResult": EvolveResult,
        "EvolveSettings": EvolveSettings,
        "Fitness": Fitness,
        "FitnessContext": FitnessContext,
        "FitnessValue": FitnessValue,
        "KLFitness": KLFitness,
        "SearchSpace": SearchSpace,
        "TaskFitness": TaskFitness,
        "evolve_merge": evolve_merge,
        "run_evolve_merge": run_evolve_merge,
    }
    if name not in exports:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return exports[name]

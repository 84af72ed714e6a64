"""What an ``merge_method: evolve`` recipe may say, validated before any compute.

```yaml
merge_method: evolve
base_model: ./base
models:
  - model: ./math
    dataset: {path: data/math/train.jsonl, samples: 16}
  - model: ./sql
    dataset: {path: data/sql/train.jsonl, fields: {instruction: question, output: query}}
    # dataset: the block DAM reads too (dammerge.data.spec): alpaca, chat or raw records
parameters:
  method: ties          # the data-free method whose parameters are searched
  normalize: true       # fixed parameters of that method, passed through unchanged
training:               # the search (pydantic, unknown keys are refused)
  budget: 96            # fitness evaluations (whole generations: budget // popsize of them)
  popsize: 8            # default: CMA-ES's 4 + 3 ln(genes)
  sigma0: 0.2           # CMA-ES step size in the normalised [0, 1] space
  layer_groups: 2       # 1 = one value for all layers, num_layers = one per layer
  module_groups: [self_attn, mlp]   # optional: separate values per module filter (+ the rest)
  search: [weight, density]         # default: those of weight, density, t, select_topk it has
  bounds: {weight: [0, 1], density: [0.1, 1]}
  fitness: kl           # or task (needs `family:`)
  samples: 16           # held-in examples per model (a dataset's own `samples` wins)
  workers: 1            # >1 or auto: forked scoring processes, one torch thread each
```

Scoring runs in one process with the threads torch chooses by default. Forked workers
(``workers: N`` or ``auto``, one torch thread each) pay off on an idle multi-core machine; where
the cores are shared, OpenMP threads of several workers spin against each other, so keep
``OMP_NUM_THREADS`` at what the cores you own can run.

The search settings live in the recipe's ``training`` block, which :class:`MergeConfig` already
keeps for data-informed methods, so an evolve recipe stays one ordinary recipe file.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dammerge.config import MergeConfig, validation_error
from dammerge.errors import ConfigError
from dammerge.methods import METHODS, MergeMethod, get_method

# Parameters with a sensible search range; any other numeric parameter needs explicit bounds.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.1, 1.0),
    "t": (0.0, 1.0),
    "lambda": (0.5, 1.5),
    "gamma": (0.0, 0.1),
    "epsilon": (0.0, 0.2),
    "select_topk": (0.1, 1.0),
}
# Parameters that are switches or labels, never searched.
NOT_SEARCHABLE = {"normalize", "rescale", "rescale_mode", "int8_mask", "filter_wise"}
DEFAULT_SEARCH = ("weight", "density", "t", "select_topk")
DEFAULT_LAYER_GROUPS = 4


class EvolveSettings(BaseModel):
    """The ``training`` block of an evolve recipe."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(default=100, ge=1)
    popsize: int | None = Field(default=None, ge=2)
    sigma0: float = Field(default=0.2, gt=0.0, le=1.0)
    layer_groups: int | None = Field(default=None, ge=1)
    module_groups: list[str] = Field(default_factory=list)
    search: list[str] | None = None
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    init: dict[str, float] = Field(default_factory=dict)
    fitness: Literal["kl", "task"] = "kl"
    samples: int = Field(default=16, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=512, ge=8)
    temperature: float = Field(default=1.0, gt=0.0)
    workers: int | Literal["auto"] = 1
    decimals: int = Field(default=6, ge=2, le=12)
    family: str | None = None
    task_limit: int | None = Field(default=16, ge=1)
    task_split: Literal["train", "eval"] = "train"
    task_domains: list[str] | None = None
    evaluate_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("bounds")
    @classmethod
    def _ordered_bounds(cls, value: dict[str, tuple[float, float]]) -> dict:
        for name, (low, high) in value.items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"bounds for {name} must be finite with low < high")
        return value

    @field_validator("module_groups")
    @classmethod
    def _distinct_filters(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or any(not f for f in value):
            raise ValueError("module_groups must be distinct, non-empty filter strings")
        return value

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("workers must be >= 1 or 'auto'")
        return value


def read_settings(cfg: MergeConfig) -> EvolveSettings:
    """The validated search settings of an evolve recipe (one-line error otherwise)."""
    try:
        return EvolveSettings.model_validate(cfg.training or {})
    except ValidationError as exc:
        raise validation_error(
            exc, EvolveSettings, "training", "see docs/evolve.md", separator="."
        ) from None


def base_method(cfg: MergeConfig) -> MergeMethod:
    """The data-free method named by ``parameters.method`` (must have something to search)."""
    name = cfg.parameters.get("method")
    if not isinstance(name, str):
        raise ConfigError(
            "an evolve recipe needs parameters.method (the data-free method to tune)",
            f"e.g. parameters: {{method: ties}}; choose from {', '.join(sorted(METHODS))}",
        )
    return get_method(name)


def searched_parameters(settings: EvolveSettings, method: MergeMethod) -> list[str]:
    """Which of the method's parameters the search tunes (validated against the method)."""
    available = [
        key for key in (*method.model_params, *method.global_params) if key not in NOT_SEARCHABLE
    ]
    if settings.search is None:
        chosen = [key for key in DEFAULT_SEARCH if key in available]
    else:
        chosen = list(dict.fromkeys(settings.search))
        for key in chosen:
            if key not in available:
                raise ConfigError(
                    f"training.search: {method.name} has no searchable parameter {key!r}",
                    f"{method.name} can search: {', '.join(available) or 'nothing'}",
                )
    if not chosen:
        raise ConfigError(
            f"{method.name} has no parameter that evolve can search",
            "choose a method with a weight, density, t or select_topk (see dammerge methods)",
        )
    for key in chosen:
        if key not in settings.bounds and key not in DEFAULT_BOUNDS:
            raise ConfigError(
                f"training.bounds: no bounds for searched parameter {key!r}",
                f"add bounds: {{{key}: [LOW, HIGH]}}",
            )
    for key in settings.bounds:
        if key not in chosen:
            raise ConfigError(
                f"training.bounds names {key!r}, which is not searched",
                f"searched parameters: {', '.join(chosen)}",
            )
    for key, value in settings.init.items():
        if key not in chosen:
            raise ConfigError(f"training.init names {key!r}, which is not searched")
        low, high = bounds_of(settings, key)
        if not low <= value <= high:
            raise ConfigError(f"training.init: {key}={value} lies outside [{low}, {high}]")
    return chosen


def bounds_of(settings: EvolveSettings, key: str) -> tuple[float, float]:
    low, high = settings.bounds.get(key, DEFAULT_BOUNDS.get(key, (0.0, 1.0)))
    return float(low), float(high)

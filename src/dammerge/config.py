"""The merge recipe: a mergekit-compatible YAML file, validated with pydantic.

```yaml
merge_method: ties
base_model: ./base
models:
  - model: ./math
    parameters: {weight: 0.5, density: [0.2, 0.8]}        # gradient over depth
  - model: ./sql
    parameters:
      weight: [{filter: self_attn, value: 0.7}, {value: 0.3}]  # per-tensor filters
parameters: {normalize: true}
dtype: float32        # compute dtype
out_dtype: bfloat16   # written dtype
tokenizer_source: base
```

Parameter values are resolved per tensor by :func:`resolve_value`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
)

from dammerge.data.spec import DatasetSpec
from dammerge.errors import ConfigError

Scalar = float | int | bool | str
ParamValue = Any  # scalar | list[float] (gradient) | list[{filter, value}]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A recipe's dtype string as a torch dtype (None stays None)."""
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {name!r}", f"use one of: {', '.join(sorted(DTYPES))}"
        ) from None


class InputModel(BaseModel):
    """One source model of the recipe."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dataset: DatasetSpec | None = None  # representative data (learned and searched methods)

    @field_serializer("dataset")
    def _dataset_as_written(self, dataset: DatasetSpec | None) -> dict[str, Any] | None:
        """The dataset block without its defaults, as a recipe states it."""
        return None if dataset is None else dataset.model_dump(exclude_defaults=True)


def read_yaml_file(path: Path, what: str) -> Any:
    """The parsed YAML of a user's file (recipe, experiment), with one-line errors."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a {what}", "pass the YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None


class MergeConfig(BaseModel):
    """A whole merge recipe."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    training: dict[str, Any] | None = None  # learned methods' settings (DAM, AdaMerging)
    name: str | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {value!r} (use {', '.join(sorted(DTYPES))})")
        return value

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        path = Path(path)
        data = read_yaml_file(path, "recipe")
        config = cls.from_dict(data, source=str(path))
        return config.relative_to(path.parent)

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> MergeConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a mapping with merge_method, models, ...")
        if "slices" in data:
            raise ConfigError(
                f"{source} uses 'slices', which dammerge does not support",
                "list whole models under 'models:' (layer-stacking/frankenmerges are out of scope)",
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "recipe"
            message = first["msg"].removeprefix("Value error, ")
            hint = "check the spelling against the README's recipe reference"
            raise ConfigError(f"{source}: {where}: {message}", hint) from None

    def relative_to(self, folder: Path) -> MergeConfig:
        """Resolve relative model and dataset paths against the recipe's folder."""

        def fix(path: str | None) -> str | None:
            if path is None:
                return path
            candidate = Path(path).expanduser()
            if not candidate.is_absolute() and not candidate.exists():
                candidate = folder / candidate
            return str(candidate)

        def fix_dataset(dataset: DatasetSpec | None) -> DatasetSpec | None:
            if dataset is None:
                return None
            return dataset.model_copy(update={"path": fix(dataset.path)})

        def fix_training(training: dict[str, Any] | None) -> dict[str, Any] | None:
            if not training or not isinstance(training.get("family"), str):
                return training
            return {**training, "family": fix(training["family"])}  # evolve's task fitness

        # 'base' and 'union' are keywords only for tokenizer_source; a model folder may well be
        # called 'base'
        tokenizer = self.tokenizer_source
        return self.model_copy(
            update={
                "base_model": fix(self.base_model),
                "models": [
                    m.model_copy(update={"model": fix(m.model), "dataset": fix_dataset(m.dataset)})
                    for m in self.models
                ],
                "tokenizer_source": tokenizer if tokenizer in ("base", "union") else fix(tokenizer),
                "training": fix_training(self.training),
            }
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _is_gradient(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def interpolate_gradient(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of ``values`` spread evenly over depth ``t`` in [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    positions = np.linspace(0.0, 1.0, len(values))
    return float(np.interp(t, positions, values))


def _filter_matches(pattern: Any, tensor_name: str) -> bool:
    """No filter or ``*`` matches all; else a substring of the name (mergekit 0.1.5) or a glob
    matched as ``*pattern*`` (older mergekit's fnmatch rule, e.g. ``layers.1*.mlp``)."""
    if pattern is None or str(pattern) in ("", "*"):
        return True
    return str(pattern) in tensor_name or fnmatchcase(tensor_name, f"*{pattern}*")


def _is_discrete_list(value: Any) -> bool:
    """A list of strings or of booleans: one is picked by depth, as mergekit does."""
    return (
        isinstance(value, list)
        and bool(value)
        and (all(isinstance(v, str) for v in value) or all(isinstance(v, bool) for v in value))
    )


def resolve_value(value: ParamValue, tensor_name: str, t: float, param: str = "parameter") -> Any:
    """Resolve a parameter value for one tensor at depth ``t``.

    - a scalar is itself;
    - a list of numbers is a gradient, interpolated over depth; a list of strings or booleans
      picks entry ``int(t * (n - 1))``;
    - a list of ``{filter, value}`` (or a single such mapping) picks the first entry whose
      ``filter`` matches the tensor name: a substring, or a glob such as ``layers.1*.mlp``
      (``*`` or no ``filter`` matches everything); its value may be a gradient. No match
      resolves to None (the caller then falls back to the global value or the default).
    """
    if isinstance(value, dict) and "value" in value and set(value) <= {"filter", "value"}:
        value = [value]
    if _is_filter_list(value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ConfigError(
                    f"{param}: filter entries need 'value' (and optionally 'filter'), got {entry}"
                )
            if _filter_matches(entry.get("filter"), tensor_name):
                return resolve_value(entry["value"], tensor_name, t, param)
        return None
    if _is_gradient(value):
        return interpolate_gradient([float(v) for v in value], t)
    if _is_discrete_list(value):
        return value[int(min(max(t, 0.0), 1.0) * (len(value) - 1))]
    if isinstance(value, list | dict):
        raise ConfigError(
            f"{param}: cannot read value {value!r}",
            "use a number, a list of numbers (gradient), or a list of {filter, value}",
        )
    return value

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
dtype: bfloat16       # inputs are rounded to this when read (as mergekit loads them)
out_dtype: bfloat16   # written dtype (default: dtype, else each tensor's stored dtype)
tokenizer_source: base
```

The arithmetic runs in float32 whatever ``dtype`` says (float64 when ``dtype: float64``) and
the result is rounded once to the output dtype; ``compute_dtype:`` overrides that (e.g.
``compute_dtype: bfloat16`` computes in the inputs' half precision). See
:func:`compute_dtype_of`. Parameter values are resolved per tensor by :func:`resolve_value`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
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
    model_validator,
)

from dammerge.checkpoint.lora import lora_reference_path
from dammerge.data.spec import DatasetSpec
from dammerge.errors import ConfigError
from dammerge.vocabulary.settings import KEYWORDS as TOKENIZER_KEYWORDS
from dammerge.vocabulary.settings import TokenizerSettings

DEFAULT_SHARD_SIZE = 5 * 2**30
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


def compute_dtype_of(dtype: str | None, compute_dtype: str | None) -> torch.dtype:
    """The dtype a data-free merge computes in: ``compute_dtype`` when the recipe sets it, else
    float64 for ``dtype: float64`` and float32 otherwise.

    ``dtype`` only rounds the inputs as they are read (what mergekit's loader does); doing the
    arithmetic in float32 and rounding once on output gives the correctly rounded result of
    linear and SLERP, as mergekit's own float32 upcast does.
    """
    explicit = parse_dtype(compute_dtype)
    if explicit is not None:
        return explicit
    return torch.float64 if parse_dtype(dtype) is torch.float64 else torch.float32


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


# mergekit 0.1.5 recipe keys dammerge does not implement yet, with what to do instead.
NOT_SUPPORTED_KEYS = {
    "modules": "list whole models under 'models:' (per-module recipes are not supported yet)",
}


@dataclass(frozen=True)
class ModelReference:
    """A recipe's model entry: a model folder, or mergekit's ``BASE+ADAPTER``, a base folder
    with a PEFT LoRA adapter folder applied to it (folded in as its tensors are read)."""

    model: str
    lora: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelReference:
        """Read a reference as mergekit does (one ``+`` separates base and adapter), except that
        an existing path is a folder even when its name has a ``+``."""
        if "+" not in text or Path(text).expanduser().exists():
            return cls(text)
        parts = text.split("+")
        if len(parts) != 2 or not all(part.strip() for part in parts):
            raise ConfigError(
                f"cannot read model reference {text!r}",
                "write a model folder, or BASE+ADAPTER (a base folder, one '+', a PEFT LoRA "
                "adapter folder)",
            )
        return cls(parts[0], parts[1])

    @property
    def key(self) -> Path:
        """The identity of the model this names: its resolved folder, or the resolved base and
        adapter folders joined by ``+`` (the ``path`` of the checkpoint it opens)."""
        if self.lora is None:
            return Path(self.model).expanduser().resolve()
        base, adapter = (Path(p).expanduser() for p in (self.model, self.lora))
        return lora_reference_path(base, adapter)

    def __str__(self) -> str:
        return self.model if self.lora is None else f"{self.model}+{self.lora}"


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


class InputSlice(BaseModel):
    """One source of an output slice: layers ``[start, end)`` of one model (mergekit's
    ``InputSliceDefinition``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(
                f"layer_range {list(value)} must be [start, end) with 0 <= start < end"
            )
        return value

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(BaseModel):
    """A run of consecutive output layers, each merged from the same offset into every source's
    layer range (mergekit's ``OutputSliceDefinition``). ``base_model`` overrides the recipe's
    for this slice; ``parameters`` sit between the sources' own and the recipe's."""

    model_config = ConfigDict(extra="forbid")

    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _equal_lengths(self) -> OutputSlice:
        lengths = [source.length for source in self.sources]
        if len(set(lengths)) > 1:
            ranges = ", ".join(f"{list(s.layer_range)}" for s in self.sources)
            raise ValueError(
                f"the sources of a slice must cover the same number of layers, got {ranges}"
            )
        return self

    @property
    def length(self) -> int:
        return self.sources[0].length


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
    slices: list[OutputSlice] | None = None  # layer ranges instead of whole models
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None  # inputs rounded to it when read; None keeps each stored dtype
    out_dtype: str | None = None  # written dtype; None: dtype, else each stored dtype
    compute_dtype: str | None = None  # arithmetic dtype; None: float32 (float64 for float64)
    tokenizer_source: str | None = None  # union | base | a model folder (the older form)
    tokenizer: TokenizerSettings | None = None  # the tokenizer block: source, tokens, padding
    chat_template: str | None = None  # a template name, a Jinja template, or auto
    training: dict[str, Any] | None = None  # learned methods' settings (DAM, AdaMerging)
    name: str | None = None

    @field_validator("dtype", "out_dtype", "compute_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {value!r} (use {', '.join(sorted(DTYPES))})")
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty: list at least one slice, or use 'models:'")
        if self.slices and self.models:
            raise ValueError("give either 'models' or 'slices', not both")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError(
                "give either 'tokenizer_source' or a 'tokenizer' block (its 'source'), not both"
            )
        return self

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
        for key, hint in NOT_SUPPORTED_KEYS.items():
            if key in data:
                raise ConfigError(f"{source}: '{key}' is not supported (yet)", hint)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "recipe"
            message = str(first["msg"]).removeprefix("Value error, ")
            hint = "check the spelling against docs/recipes.md"
            if first["type"] == "value_error":
                hint = "see docs/recipes.md for the recipe's keys"
            raise ConfigError(f"{source}: {where}: {message}", hint) from None

    def map_paths(self, fix: Callable[[str], str]) -> MergeConfig:
        """A copy with every path of the recipe passed through ``fix``: base and source models
        (both folders of a BASE+ADAPTER reference), slice sources, datasets, the tokenizer's
        folders (``tokenizer_source``, the ``tokenizer`` block) and evolve's
        ``training.family``."""

        def fix_reference(reference: str | None) -> str | None:
            """A model reference with each folder fixed (both halves of BASE+ADAPTER)."""
            if reference is None:
                return None
            whole = fix(reference)
            if Path(whole).exists():
                return whole
            parsed = ModelReference.parse(reference)
            if parsed.lora is None:
                return whole
            return str(ModelReference(fix(parsed.model), fix(parsed.lora)))

        def fix_dataset(dataset: DatasetSpec | None) -> DatasetSpec | None:
            if dataset is None:
                return None
            return dataset.model_copy(update={"path": fix(dataset.path)})

        def fix_training(training: dict[str, Any] | None) -> dict[str, Any] | None:
            if not training or not isinstance(training.get("family"), str):
                return training
            return {**training, "family": fix(training["family"])}  # evolve's task fitness

        def fix_slice(out_slice: OutputSlice) -> OutputSlice:
            sources = [
                s.model_copy(update={"model": fix_reference(s.model)}) for s in out_slice.sources
            ]
            return out_slice.model_copy(
                update={"sources": sources, "base_model": fix_reference(out_slice.base_model)}
            )

        # 'base' and 'union' are keywords only for tokenizer_source; a model folder may well be
        # called 'base'
        tokenizer = self.tokenizer_source
        if tokenizer is not None and tokenizer not in TOKENIZER_KEYWORDS:
            tokenizer = fix(tokenizer)
        block = self.tokenizer
        return self.model_copy(
            update={
                "base_model": fix_reference(self.base_model),
                "models": [
                    m.model_copy(
                        update={"model": fix_reference(m.model), "dataset": fix_dataset(m.dataset)}
                    )
                    for m in self.models
                ],
                "slices": None if self.slices is None else [fix_slice(s) for s in self.slices],
                "tokenizer_source": tokenizer,
                "tokenizer": None if block is None else block.with_paths(fix),
                "training": fix_training(self.training),
            }
        )

    def relative_to(self, folder: Path) -> MergeConfig:
        """Resolve the recipe's relative paths: from the recipe's folder, or, where nothing is
        there, from the current folder (mergekit's habit, and how ``examples/`` reach
        ``./family`` from the repository root)."""

        def fix(path: str) -> str:
            candidate = Path(path).expanduser()
            if candidate.is_absolute():
                return str(candidate)
            beside_recipe = folder / candidate
            if not beside_recipe.exists() and candidate.exists():
                return str(candidate)
            return str(beside_recipe)

        return self.map_paths(fix)

    def to_yaml(self, folder: Path | None = None) -> str:
        """The recipe as YAML. With ``folder`` (where the file is saved), every path is
        written relative to that folder, so the file works from anywhere
        (:func:`relative_to` reads it back from the file's folder), and a comment says so."""
        config = self if folder is None else self.map_paths(lambda p: path_from(folder, p))
        data = config.model_dump(mode="json", exclude_none=True)  # tuples as lists
        if config.slices:
            del data["models"]  # mergekit reads exactly one of the two
        text = yaml.safe_dump(data, sort_keys=False)
        return text if folder is None else PORTABLE_PATHS_NOTE + text


PORTABLE_PATHS_NOTE = (
    "# Paths are relative to the folder of this file (absolute where none exists), so\n"
    "# `dammerge merge` reads this recipe from any working folder.\n"
)


def path_from(folder: Path, path: str) -> str:
    """``path`` as seen from ``folder``: relative when both are on one file system tree,
    absolute otherwise (another drive on Windows). Both are resolved first (symbolic links
    followed), so the relative path walks the real folders, as the operating system does."""
    target = Path(path).expanduser().resolve()
    try:
        return Path(os.path.relpath(target, Path(folder).resolve())).as_posix()
    except ValueError:
        return str(target)


def load_config(config: MergeConfig | dict[str, Any] | str | Path) -> MergeConfig:
    """A recipe as a :class:`MergeConfig`: given as one already, as a dict shaped like the YAML,
    or as the path of a YAML file (relative paths then resolve from the file's folder)."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        return MergeConfig.from_dict(config)
    return MergeConfig.from_yaml(config)


@dataclass(frozen=True)
class RunOptions:
    """How a merge runs, the same for every method: the command line's flags.

    ``seed`` drives stochastic kernels (DARE, DELLA), data order and initialisation of learned
    methods, and the search's sampling; ``dry_run`` validates everything and prints the plan
    without computing; ``progress`` shows bars and messages.
    """

    device: str = "cpu"
    seed: int = 0
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    dry_run: bool = False
    allow_pickle: bool = False
    progress: bool = True


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


FILTER_KEYS = {"filter", "filter_glob", "value"}


def _filter_matches(entry: dict[str, Any], tensor_name: str) -> bool:
    """Whether a ``{filter, value}`` entry applies to ``tensor_name``.

    ``filter`` matches as mergekit 0.1.5 does: a substring of the name; ``*`` or no filter
    matches everything. ``filter_glob`` (dammerge only, never implied) is a shell glob matched
    anywhere in the name, e.g. ``layers.1*.mlp``.
    """
    if "filter_glob" in entry:
        return fnmatchcase(tensor_name, f"*{entry['filter_glob']}*")
    pattern = entry.get("filter")
    if pattern is None or str(pattern) in ("", "*"):
        return True
    return str(pattern) in tensor_name


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
      ``filter`` is a substring of the tensor name, as in mergekit 0.1.5 (``*`` or no
      ``filter`` matches everything), or whose ``filter_glob`` matches it as a shell glob
      (``layers.1*.mlp``); its value may be a gradient. No match
      resolves to None (the caller then falls back to the global value or the default).
    """
    if isinstance(value, dict) and "value" in value and set(value) <= FILTER_KEYS:
        value = [value]
    if _is_filter_list(value):
        for entry in value:
            unknown = set(entry) - FILTER_KEYS
            if unknown or "value" not in entry:
                raise ConfigError(
                    f"{param}: filter entries need 'value' (and optionally 'filter' or "
                    f"'filter_glob'), got {entry}"
                )
            if "filter" in entry and "filter_glob" in entry:
                raise ConfigError(
                    f"{param}: an entry takes 'filter' (substring) or 'filter_glob', not both",
                    "keep one of them",
                )
            if _filter_matches(entry, tensor_name):
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

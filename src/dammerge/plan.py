"""From a validated recipe to a merge plan: which inputs, which tensors, which parameters.

Everything that can be wrong with the inputs is found here, before a byte is written: unknown
method or parameter, missing base, wrong number of models, and checkpoints that do not share
tensor names and shapes (all mismatches are listed at once).
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge.checkpoint.architecture import TensorInfo, TensorKind
from dammerge.checkpoint.reader import Checkpoint
from dammerge.config import (
    MergeConfig,
    check_model_reference,
    compute_dtype_of,
    parse_dtype,
    resolve_value,
)
from dammerge.errors import CheckpointError, ConfigError
from dammerge.methods import METHODS, REQUIRED, MergeMethod, get_method

MAX_LISTED_MISMATCHES = 8


@dataclass
class TensorPlan:
    """How one output tensor is made."""

    name: str
    info: TensorInfo
    shape: tuple[int, ...]
    dtype: torch.dtype
    depth: float
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    copy_from_reference: bool = False  # non-float tensors (buffers) are copied, not merged


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    reference: Checkpoint  # base if given, else the first model: names, config, tokenizer
    base: Checkpoint | None
    participants: list[Checkpoint]
    tensors: list[TensorPlan] = field(default_factory=list)
    input_dtype: torch.dtype | None = None  # inputs rounded to it when read (recipe's dtype)
    compute_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None

    @property
    def inputs(self) -> list[Checkpoint]:
        seen: dict[Path, Checkpoint] = {}
        for ck in [self.reference, *([self.base] if self.base else []), *self.participants]:
            seen.setdefault(ck.path, ck)
        return list(seen.values())

    @property
    def held_dtype(self) -> torch.dtype:
        """The dtype a caller that keeps the inputs in memory (the search) holds them in: the
        recipe's ``dtype`` (they are rounded to it anyway), else the compute dtype."""
        return self.input_dtype or self.compute_dtype

    def output_dtype(self, tensor: TensorPlan) -> torch.dtype:
        """The written dtype: ``out_dtype`` for float tensors; integer/bool buffers keep theirs
        (casting a position-id or mask buffer to bfloat16 would corrupt it)."""
        if not tensor.dtype.is_floating_point:
            return tensor.dtype
        return self.out_dtype or tensor.dtype

    def output_bytes(self) -> int:
        total = 0
        for t in self.tensors:
            count = 1
            for size in t.shape:
                count *= size
            total += count * self.output_dtype(t).itemsize
        return total

    def tokenizer_folder(self) -> Path:
        source = self.config.tokenizer_source
        if source in (None, "base"):
            return self.reference.path
        return Path(source)


def build_plan(config: MergeConfig, *, allow_pickle: bool = False) -> MergePlan:
    method = get_method(config.merge_method)
    check_parameters(config, method)
    if not config.models:
        raise ConfigError("the recipe lists no models", "add a 'models:' list")
    if method.requires_base and not config.base_model:
        raise ConfigError(f"{method.name} needs a base_model", "set base_model: PATH")
    if config.tokenizer_source == "union":
        raise ConfigError(
            "tokenizer_source: union is not supported",
            "merge models that share one tokenizer; use 'base' or a model path",
        )

    cache: dict[Path, Checkpoint] = {}

    def load(path: str) -> Checkpoint:
        check_model_reference(path)
        key = Path(path).resolve()
        if key not in cache:
            cache[key] = Checkpoint(path, allow_pickle=allow_pickle)
        return cache[key]

    base = load(config.base_model) if config.base_model else None
    entries = [(m, load(m.model)) for m in config.models]
    if method.requires_base and base is not None:
        entries = [(m, ck) for m, ck in entries if ck.path != base.path]
    _check_model_count(method, len(entries))
    participants = [ck for _, ck in entries]
    reference = base or participants[0]
    check_compatible(reference, [ck for ck in cache.values() if ck is not reference])

    plan = MergePlan(
        config=config,
        method=method,
        reference=reference,
        base=base if method.requires_base else None,
        participants=participants,
        input_dtype=parse_dtype(config.dtype),
        compute_dtype=compute_dtype_of(config.dtype, config.compute_dtype),
        out_dtype=parse_dtype(config.out_dtype) or parse_dtype(config.dtype),
    )
    if config.tokenizer_source not in (None, "base"):
        folder = plan.tokenizer_folder()
        if (
            not (folder / "tokenizer.json").is_file()
            and not (folder / "tokenizer_config.json").is_file()
        ):
            raise ConfigError(f"tokenizer_source {folder} holds no tokenizer files")
    architecture = reference.architecture
    for name in reference.names():
        info = reference.info(name)
        # mergekit resolves every tensor outside the blocks (embeddings, final norm, lm_head)
        # at t = 0, the gradient's first value; same recipe, same tensors.
        depth = architecture.depth_fraction(info) if info.layer is not None else 0.0
        dtype = reference.dtype(name)
        plan.tensors.append(
            TensorPlan(
                name=name,
                info=info,
                shape=reference.shape(name),
                dtype=dtype,
                depth=depth,
                model_params=[
                    _resolve_model_params(method, config, m.parameters, name, depth)
                    for m, _ in entries
                ],
                params=_resolve_global_params(method, config, name, depth),
                copy_from_reference=not dtype.is_floating_point,
            )
        )
        check_values(method, plan.tensors[-1])
    return plan


class UnusedParameterWarning(UserWarning):
    """A recipe sets a parameter that another merge method takes but this one ignores."""


def _parameters_by_method() -> dict[str, set[str]]:
    return {name: set(m.model_params) | set(m.global_params) for name, m in METHODS.items()}


def check_parameters(config: MergeConfig, method: MergeMethod) -> None:
    """Every parameter the recipe names is one the method takes (per model or global).

    A parameter another data-free method takes but this one does not (mergekit's own tests
    pass ``weight`` to slerp and ``density`` to task_arithmetic, which mergekit ignores) is
    ignored with an :class:`UnusedParameterWarning`; any other name is a typo and an error,
    with the closest accepted name as a suggestion.
    """
    known_model = set(method.model_params)
    known_global = set(method.global_params) | known_model
    named = [(key, "global") for key in config.parameters if key not in known_global] + [
        (key, f"model {m.model}")
        for m in config.models
        for key in m.parameters
        if key not in known_model
    ]
    misplaced = [key for key, where in named if where != "global" and key in known_global]
    if misplaced:
        raise ConfigError(
            f"'{misplaced[0]}' is a global parameter of {method.name}, set per model",
            f"move it to the recipe's top-level parameters: {{{misplaced[0]}: ...}}",
        )
    by_method = _parameters_by_method()
    elsewhere = set().union(*by_method.values())
    typos = [(key, where) for key, where in named if key not in elsewhere]
    if typos:
        key, where = typos[0]
        accepted = ", ".join(sorted(known_global)) or "none"
        guess = difflib.get_close_matches(key, sorted(known_global | elsewhere), n=1)
        suggestion = f"; did you mean '{guess[0]}'?" if guess else ""
        raise ConfigError(
            f"unknown parameter '{key}' ({where}) for {method.name}{suggestion}",
            f"{method.name} accepts: {accepted}",
        )
    for key in dict.fromkeys(key for key, _ in named):
        users = sorted(name for name, params in by_method.items() if key in params)
        warnings.warn(
            f"{method.name} does not use parameter '{key}' (taken by {', '.join(users[:3])}"
            f"{', ...' if len(users) > 3 else ''}): ignored",
            UnusedParameterWarning,
            stacklevel=1,  # one location: shown once though the registry and the plan check
        )


NUMERIC_PARAMETERS = {"weight", "density", "gamma", "epsilon", "lambda", "t", "select_topk"}
FRACTIONS = {"density", "gamma", "select_topk"}  # shares of a tensor's entries
RESCALE_MODES = {"l1", "density", "probability"}


def check_values(method: MergeMethod, tensor: TensorPlan) -> None:
    """The resolved parameters of one tensor are values its method can use, so a bad value
    fails ``--dry-run`` rather than the merge halfway through."""
    for params in [*tensor.model_params, tensor.params]:
        for key, value in params.items():
            if key in NUMERIC_PARAMETERS and not _is_number(value):
                _bad_value(method, tensor, key, value, "a number")
            if key in FRACTIONS and not 0.0 <= value <= 1.0:
                _bad_value(method, tensor, key, value, "in [0, 1]")
            if key == "rescale_mode" and value not in RESCALE_MODES:
                _bad_value(method, tensor, key, value, f"one of {sorted(RESCALE_MODES)}")
        if "epsilon" in params:
            _check_epsilon(method, tensor, float(params["density"]), float(params["epsilon"]))


def _check_epsilon(method: MergeMethod, tensor: TensorPlan, density: float, eps: float) -> None:
    """DELLA's keep probabilities run from density - epsilon to density + epsilon: both must
    be probabilities (density 0 and 1 keep nothing or everything and ignore epsilon)."""
    if eps < 0.0:
        _bad_value(method, tensor, "epsilon", eps, ">= 0")
    if 0.0 < density < 1.0 and not (density - eps > 0.0 and density + eps <= 1.0):
        raise ConfigError(
            f"{method.name}: density {density} ± epsilon {eps} leaves [0, 1] for {tensor.name}",
            "choose epsilon < min(density, 1 - density)",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bad_value(method: MergeMethod, tensor: TensorPlan, key: str, value: Any, want: str) -> None:
    raise ConfigError(
        f"{method.name}: parameter '{key}' is {value!r} for {tensor.name}; it must be {want}",
        f"fix '{key}' in the recipe's parameters",
    )


def _check_model_count(method: MergeMethod, count: int) -> None:
    extra = " besides the base" if method.requires_base else ""
    if count < method.min_models:
        raise ConfigError(
            f"{method.name} needs at least {method.min_models} model(s){extra}, got {count}"
        )
    if method.max_models is not None and count > method.max_models:
        raise ConfigError(
            f"{method.name} takes at most {method.max_models} model(s){extra}, got {count}",
            "slerp interpolates between base_model and exactly one other model",
        )


def check_compatible(reference: Checkpoint, others: list[Checkpoint]) -> None:
    problems: list[str] = []
    ref_names = set(reference.names())
    for other in others:
        names = set(other.names())
        for name in sorted(ref_names - names):
            problems.append(f"{other.name} lacks {name}")
        for name in sorted(names - ref_names):
            problems.append(f"{other.name} has extra tensor {name}")
        for name in sorted(ref_names & names):
            if reference.shape(name) != other.shape(name):
                problems.append(
                    f"{name}: {reference.name} {list(reference.shape(name))} vs "
                    f"{other.name} {list(other.shape(name))}"
                )
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_MISMATCHES])
        more = len(problems) - MAX_LISTED_MISMATCHES
        suffix = f"; and {more} more" if more > 0 else ""
        raise CheckpointError(
            f"models do not share tensor names and shapes: {listed}{suffix}",
            "merge only models fine-tuned from the same base (same architecture and vocab)",
        )


def _resolve_model_params(
    method: MergeMethod,
    config: MergeConfig,
    own: dict[str, Any],
    name: str,
    depth: float,
) -> dict[str, Any]:
    resolved = {}
    for key, default in method.model_params.items():
        value = None
        for source in (own, config.parameters):
            if key in source:
                value = resolve_value(source[key], name, depth, key)
                if value is not None:
                    break
        if value is None:
            if default is REQUIRED:
                raise ConfigError(
                    f"{method.name} needs parameter '{key}' for every model (missing for {name})",
                    f"add parameters: {{{key}: ...}} to each model or to the global parameters",
                )
            value = default
        resolved[key] = value
    return resolved


def _resolve_global_params(
    method: MergeMethod, config: MergeConfig, name: str, depth: float
) -> dict[str, Any]:
    resolved = {}
    for key, default in method.global_params.items():
        value = None
        if key in config.parameters:
            value = resolve_value(config.parameters[key], name, depth, key)
        if value is None:
            if default is REQUIRED:
                raise ConfigError(
                    f"{method.name} needs the global parameter '{key}'",
                    f"add parameters: {{{key}: ...}} at the top level of the recipe",
                )
            value = default
        resolved[key] = value
    return resolved


def _dtype_line(plan: MergePlan) -> str:
    def name(dtype: torch.dtype | None, unset: str) -> str:
        return unset if dtype is None else str(dtype).removeprefix("torch.")

    return (
        f"inputs read as {name(plan.input_dtype, 'stored')}, computed in "
        f"{name(plan.compute_dtype, '')}, written as {name(plan.out_dtype, 'stored')}"
    )


def describe(plan: MergePlan) -> list[str]:
    """Human-readable lines summarising a plan (for --dry-run)."""
    kinds: dict[TensorKind, int] = {}
    for t in plan.tensors:
        kinds[t.info.kind] = kinds.get(t.info.kind, 0) + 1
    lines = [
        f"method      {plan.method.name}: {plan.method.summary}",
        f"base        {plan.base.path if plan.base else '(none)'}",
        *[f"model       {ck.path}" for ck in plan.participants],
        f"tensors     {len(plan.tensors)} ("
        + ", ".join(f"{n} {k.value}" for k, n in sorted(kinds.items(), key=lambda kv: kv[0]))
        + ")",
        f"layers      {plan.reference.architecture.num_layers}",
        f"dtypes      {_dtype_line(plan)}",
        f"output size {plan.output_bytes() / 2**20:.1f} MiB",
    ]
    shown: set[str] = set()
    for t in plan.tensors:
        key = repr((t.model_params, t.params))
        if key in shown:
            continue
        shown.add(key)
        lines.append(f"params      {t.name}: models={t.model_params} global={t.params}")
        if len(shown) >= 12:
            lines.append("params      ... (further distinct parameter sets not shown)")
            break
    return lines

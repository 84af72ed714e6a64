"""From a validated recipe to a merge plan: which inputs, which tensors, which parameters.

Everything that can be wrong with the inputs is found here, before a byte is written: unknown
method or parameter, missing base, wrong number of models, and checkpoints that do not share
tensor names and shapes (all mismatches are listed at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge.checkpoint.architecture import TensorInfo, TensorKind
from dammerge.checkpoint.reader import Checkpoint
from dammerge.config import MergeConfig, parse_dtype, resolve_value
from dammerge.errors import CheckpointError, ConfigError
from dammerge.methods import REQUIRED, MergeMethod, get_method

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
    compute_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None

    @property
    def inputs(self) -> list[Checkpoint]:
        seen: dict[Path, Checkpoint] = {}
        for ck in [self.reference, *([self.base] if self.base else []), *self.participants]:
            seen.setdefault(ck.path, ck)
        return list(seen.values())

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
        compute_dtype=parse_dtype(config.dtype) or torch.float32,
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
    return plan


def check_parameters(config: MergeConfig, method: MergeMethod) -> None:
    """Every parameter the recipe names is one the method takes (per model or global)."""
    known_model = set(method.model_params)
    known_global = set(method.global_params) | known_model
    problems = [f"'{key}' (global)" for key in config.parameters if key not in known_global] + [
        f"'{key}' (model {m.model})"
        for m in config.models
        for key in m.parameters
        if key not in known_model
    ]
    if problems:
        accepted = ", ".join(sorted(known_global)) or "none"
        raise ConfigError(
            f"unknown parameter {problems[0]} for {method.name}",
            f"{method.name} accepts: {accepted}",
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
        f"compute     {str(plan.compute_dtype).removeprefix('torch.')}",
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

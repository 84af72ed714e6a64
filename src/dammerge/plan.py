"""From a validated recipe to a merge plan: which inputs, which tensors, which parameters.

Everything that can be wrong with the inputs is found here, before a byte is written: unknown
method or parameter, missing base, wrong number of models, and checkpoints that do not share
tensor names and shapes (all mismatches are listed at once).
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge.checkpoint.architecture import TensorInfo, TensorKind
from dammerge.checkpoint.lora import open_model
from dammerge.checkpoint.reader import Checkpoint
from dammerge.config import (
    MergeConfig,
    ModelReference,
    compute_dtype_of,
    parse_dtype,
    resolve_value,
)
from dammerge.errors import CheckpointError, ConfigError
from dammerge.methods import METHODS, REQUIRED, MergeMethod, get_method
from dammerge.vocabulary.build import OutputVocabulary, build_vocabulary, has_tokenizer
from dammerge.vocabulary.chat import chat_template_text
from dammerge.vocabulary.rows import RowAlignment, plan_rows, resolve_fill_sources
from dammerge.vocabulary.settings import TokenizerSettings, reference_key, tokenizer_settings

MAX_LISTED_MISMATCHES = 8


@dataclass(frozen=True)
class TensorSource:
    """Where one input of an output tensor is read: a model folder and a tensor name in it
    (another layer's name when slices move layers)."""

    model: Path
    tensor: str


@dataclass
class TensorPlan:
    """How one output tensor is made: from which tensors of which models, with which resolved
    parameters."""

    name: str
    info: TensorInfo
    shape: tuple[int, ...]
    dtype: torch.dtype
    depth: float
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    sources: list[TensorSource]  # the participating models' tensors, in recipe order
    base_source: TensorSource | None = None
    copy_from_reference: bool = False  # non-float tensors (buffers): sources[0], unchanged
    rows: RowAlignment | None = None  # a vocabulary tensor's inputs rebuilt in the output vocab


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    reference: Checkpoint  # base if given, else the first model: names, config, tokenizer
    base: Checkpoint | None
    participants: list[Checkpoint]  # with slices: every other model any slice reads
    tensors: list[TensorPlan] = field(default_factory=list)
    input_dtype: torch.dtype | None = None  # inputs rounded to it when read (recipe's dtype)
    compute_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None
    # with slices: per output layer, the config.json of the model it comes from and its index
    layer_origins: list[tuple[dict[str, Any], int]] | None = None
    vocabulary: OutputVocabulary | None = None  # with a tokenizer source or block
    chat_template: str | None = None  # the Jinja text written into the output's tokenizer

    @property
    def inputs(self) -> list[Checkpoint]:
        seen: dict[Path, Checkpoint] = {}
        for ck in [self.reference, *([self.base] if self.base else []), *self.participants]:
            seen.setdefault(ck.path, ck)
        return list(seen.values())

    @property
    def num_layers(self) -> int | None:
        """The output's number of blocks: the reference's, or the slices' total."""
        if self.layer_origins is not None:
            return len(self.layer_origins)
        return self.reference.architecture.num_layers

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

    def output_config(self) -> dict[str, Any]:
        """The output's ``config.json`` (before its dtype is set): the reference's, with the
        layer count and per-layer lists rewritten when slices restack the layers."""
        config = dict(self.reference.config)
        if self.layer_origins is not None:
            keys = self.reference.architecture.spec.num_layers_keys
            config = restacked_config(config, keys, self.layer_origins)
        if self.vocabulary is not None:
            config = with_vocab_size(config, self.vocabulary.padded_size)
        return config

    def tokenizer_folder(self) -> Path:
        """The folder whose tokenizer the output gets (before any tokens are added)."""
        if self.vocabulary is not None:
            return self.vocabulary.source_folder
        source = self.config.tokenizer_source
        if source in (None, "base", "union"):
            return self.reference.folder
        return Path(source)


def with_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """``config`` with its ``vocab_size`` (top level, else its ``text_config``'s) set."""
    config = copy.deepcopy(config)
    text = config.get("text_config")
    section = text if "vocab_size" not in config and isinstance(text, dict) else config
    section["vocab_size"] = size
    return config


# config.json entries holding one value per layer, rebuilt from each output layer's origin
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def _layer_section(config: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The part of a config that counts layers: itself, or its ``text_config``."""
    text = config.get("text_config")
    if not any(key in config for key in keys) and isinstance(text, dict):
        return text
    return config


def restacked_config(
    config: dict[str, Any], keys: tuple[str, ...], origins: list[tuple[dict[str, Any], int]]
) -> dict[str, Any]:
    """``config`` for a model whose layer ``j`` is layer ``origins[j][1]`` of the model whose
    config is ``origins[j][0]``: the layer count (``num_hidden_layers`` or the architecture's
    key) is ``len(origins)``, and per-layer lists such as ``layer_types`` are rebuilt from each
    layer's origin (dropped, for transformers to rebuild, when an origin lacks one)."""
    config = copy.deepcopy(config)
    section = _layer_section(config, keys)
    for key in keys:
        if key in section:
            section[key] = len(origins)
    for key in PER_LAYER_CONFIG_KEYS:
        if not isinstance(section.get(key), list):
            continue
        values = []
        for source, layer in origins:
            listed = _layer_section(source, keys).get(key)
            if not isinstance(listed, list) or layer >= len(listed):
                del section[key]
                break
            values.append(listed[layer])
        else:
            section[key] = values
    return config


@dataclass(frozen=True)
class SliceInput:
    """One model of a planned slice and the first of its layers the slice reads."""

    checkpoint: Checkpoint
    start: int
    parameters: dict[str, Any]

    def source(self, name: str, arch_pattern: str, offset: int | None) -> TensorSource:
        """This input's tensor for ``name`` (a tensor of the slice's template layer), or
        ``name`` itself outside the blocks (``offset`` None)."""
        tensor = name if offset is None else renumber_layer(name, arch_pattern, self.start + offset)
        return TensorSource(self.checkpoint.path, tensor)


@dataclass(frozen=True)
class PlannedSlice:
    """An output slice resolved against its checkpoints (a whole-model recipe is one slice)."""

    participants: list[SliceInput]
    base: SliceInput | None
    copy_from: SliceInput  # the model non-float buffers and the layers' tensor names come from
    length: int
    parameters: dict[str, Any]


def renumber_layer(name: str, layer_pattern: str, index: int) -> str:
    """``name`` with its block index (the first group of ``layer_pattern``) set to ``index``."""
    match = re.search(layer_pattern, name)
    if match is None:
        return name
    start, end = match.span(1)
    return f"{name[:start]}{index}{name[end:]}"


class _Loader:
    """Opens each model reference once: a folder, or a base with a LoRA adapter folded in
    (whose adapter is checked against the base here, before any compute)."""

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.cache: dict[Path, Checkpoint] = {}

    def __call__(self, reference: str) -> Checkpoint:
        parsed = ModelReference.parse(reference)
        if parsed.key not in self.cache:
            self.cache[parsed.key] = open_model(
                parsed.model, parsed.lora, allow_pickle=self.allow_pickle
            )
        return self.cache[parsed.key]


def build_plan(config: MergeConfig, *, allow_pickle: bool = False) -> MergePlan:
    method = get_method(config.merge_method)
    check_parameters(config, method)
    if not config.models and not config.slices:
        raise ConfigError("the recipe lists no models", "add a 'models:' list (or 'slices:')")
    slice_bases = bool(config.slices) and all(s.base_model for s in config.slices or [])
    if method.requires_base and not config.base_model and not slice_bases:
        raise ConfigError(f"{method.name} needs a base_model", "set base_model: PATH")
    vocabulary = tokenizer_settings(config.tokenizer, config.tokenizer_source)
    load = _Loader(allow_pickle)
    # with a tokenizer source, vocabulary tensors may differ in rows: they are rebuilt
    free_rows = vocabulary is not None
    if config.slices:
        plan = _sliced_plan(config, method, load, free_rows)
    else:
        plan = _whole_model_plan(config, method, load, free_rows)
    if vocabulary is not None:
        attach_vocabulary(plan, vocabulary, load)
    if config.chat_template is not None:
        attach_chat_template(plan, config.chat_template)
    for tensor in plan.tensors:
        check_values(method, tensor)
    return plan


def attach_vocabulary(plan: MergePlan, settings: TokenizerSettings, load: _Loader) -> None:
    """Build the output vocabulary and plan each vocabulary tensor's rows in it."""
    vocabulary = build_vocabulary(settings, plan.reference, plan.inputs)
    recipe_models = {reference_key(ref): load(ref).path for ref in recipe_references(plan.config)}
    fills = resolve_fill_sources(vocabulary, recipe_models)
    base_model = plan.config.base_model
    base = recipe_models[reference_key(base_model)] if base_model else None
    by_path = {ck.path: ck for ck in plan.inputs}
    for tensor in plan.tensors:
        if tensor.copy_from_reference or not plan.reference.architecture.is_vocabulary(tensor.name):
            continue
        sources = [*tensor.sources, *([tensor.base_source] if tensor.base_source else [])]
        inputs = [(s.model, by_path[s.model].shape(s.tensor)[0]) for s in sources]
        tensor.rows = plan_rows(vocabulary, fills, inputs, base, tensor.name)
        tensor.shape = (vocabulary.padded_size, *tensor.shape[1:])
    plan.vocabulary = vocabulary


def attach_chat_template(plan: MergePlan, spec: str) -> None:
    """Resolve the recipe's ``chat_template`` (a name, Jinja, or ``auto``) for the output."""
    folder = plan.tokenizer_folder()
    if not has_tokenizer(folder):
        raise CheckpointError(
            f"chat_template needs a tokenizer to write it into, and {folder} has none",
            "copy the model's tokenizer files into its folder",
        )
    plan.chat_template = chat_template_text(spec, [ck.folder for ck in plan.inputs])


def recipe_references(config: MergeConfig) -> list[str]:
    """Every model reference of the recipe: the base, the models, the slices' sources."""
    references = [config.base_model] if config.base_model else []
    references += [m.model for m in config.models]
    for out_slice in config.slices or []:
        references += [s.model for s in out_slice.sources]
        references += [out_slice.base_model] if out_slice.base_model else []
    return list(dict.fromkeys(references))


def _new_plan(
    config: MergeConfig,
    method: MergeMethod,
    reference: Checkpoint,
    base: Checkpoint | None,
    participants: list[Checkpoint],
) -> MergePlan:
    return MergePlan(
        config=config,
        method=method,
        reference=reference,
        base=base,
        participants=participants,
        input_dtype=parse_dtype(config.dtype),
        compute_dtype=compute_dtype_of(config.dtype, config.compute_dtype),
        out_dtype=parse_dtype(config.out_dtype) or parse_dtype(config.dtype),
    )


def _whole_model_plan(
    config: MergeConfig, method: MergeMethod, load: _Loader, free_rows: bool = False
) -> MergePlan:
    """Every tensor of the reference, merged from the same tensor of every model."""
    base = load(config.base_model) if config.base_model else None
    entries = [(m.parameters, load(m.model)) for m in config.models]
    listed = base is not None and any(ck.path == base.path for _, ck in entries)
    if method.takes_base and base is not None:
        entries = [(params, ck) for params, ck in entries if ck.path != base.path]
    elif method.base_joins_models and base is not None and not listed:
        entries.append(({}, base))  # mergekit merges an unlisted base as the last model
    _check_model_count(method, len(entries))
    participants = [ck for _, ck in entries]
    reference = base or participants[0]
    others = [ck for ck in load.cache.values() if ck is not reference]
    check_compatible(reference, others, free_rows=free_rows)
    plan = _new_plan(config, method, reference, base if method.takes_base else None, participants)
    whole = PlannedSlice(
        participants=[SliceInput(ck, 0, params) for params, ck in entries],
        base=SliceInput(base, 0, {}) if plan.base is not None and base is not None else None,
        copy_from=SliceInput(reference, 0, {}),
        length=reference.architecture.num_layers or 0,
        parameters={},
    )
    architecture = reference.architecture
    for name in reference.names():
        info = reference.info(name)
        # mergekit resolves every tensor outside the blocks (embeddings, final norm, lm_head)
        # at t = 0, the gradient's first value; same recipe, same tensors.
        depth = architecture.depth_fraction(info) if info.layer is not None else 0.0
        plan.tensors.append(_tensor_plan(plan, whole, name, info, None, depth))
    return plan


def _sliced_plan(
    config: MergeConfig, method: MergeMethod, load: _Loader, free_rows: bool = False
) -> MergePlan:
    """mergekit's ``slices``: the tensors outside the blocks from the first slice (embeddings)
    and the last (final norm, ``lm_head``), then each slice's layers in turn, renumbered; a
    gradient restarts in every slice (``t = i / (length - 1)``, 1 for a one-layer slice)."""
    assert config.slices
    planned = [_plan_slice(config, method, load, i) for i, s in enumerate(config.slices)]
    first = planned[0]
    global_base = load(config.base_model) if config.base_model else None
    reference = global_base or first.copy_from.checkpoint
    base = global_base if method.takes_base else None
    others: dict[Path, Checkpoint] = {}
    for out_slice in planned:
        for item in [*out_slice.participants, *([out_slice.base] if out_slice.base else [])]:
            if base is None or item.checkpoint.path != base.path:
                others.setdefault(item.checkpoint.path, item.checkpoint)
    plan = _new_plan(config, method, reference, base, list(others.values()))
    architecture = reference.architecture
    outside = [n for n in reference.names() if architecture.layer_index(n) is None]
    pre = [n for n in outside if reference.info(n).kind == TensorKind.EMBEDDING]
    post = [n for n in outside if n not in pre]
    plan.tensors.extend(_tensor_plan(plan, first, n, reference.info(n), None, 0.0) for n in pre)
    plan.layer_origins = []
    for out_slice in planned:
        template = out_slice.copy_from
        names = _names_by_layer(template.checkpoint)
        for offset in range(out_slice.length):
            depth = offset / (out_slice.length - 1) if out_slice.length > 1 else 1.0
            index = len(plan.layer_origins)
            for source_name in names.get(template.start + offset, []):
                name = renumber_layer(source_name, architecture.spec.layer_pattern, index)
                info = architecture.classify(name, len(template.checkpoint.shape(source_name)))
                plan.tensors.append(_tensor_plan(plan, out_slice, name, info, offset, depth))
            plan.layer_origins.append((template.checkpoint.config, template.start + offset))
    last = planned[-1]
    plan.tensors.extend(_tensor_plan(plan, last, n, reference.info(n), None, 0.0) for n in post)
    _check_sources(plan, free_rows)
    return plan


def _plan_slice(
    config: MergeConfig, method: MergeMethod, load: _Loader, index: int
) -> PlannedSlice:
    """Slice ``index`` of the recipe against its checkpoints: ranges inside each model, the
    base among the sources when the method needs one, and the method's model count."""
    assert config.slices
    out_slice = config.slices[index]
    where = f"slice {index}"
    inputs = []
    for source in out_slice.sources:
        ck = load(source.model)
        depth = _layer_count(ck)
        if source.layer_range[1] > depth:
            raise ConfigError(
                f"{where}: layer_range {list(source.layer_range)} goes past {ck.name}'s "
                f"{depth} layers",
                f"use a range within [0, {depth}]",
            )
        inputs.append(SliceInput(ck, source.layer_range[0], source.parameters))
    paths = [item.checkpoint.path for item in inputs]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"{where} lists the same model twice", "give each model once per slice")
    base = None
    base_path = out_slice.base_model or config.base_model
    if method.requires_base or (method.optional_base and base_path is not None):
        assert base_path is not None  # build_plan checked it
        base_ck = load(base_path)
        base = next((i for i in inputs if i.checkpoint.path == base_ck.path), None)
        if base is None:
            raise ConfigError(
                f"{where}: its base model {base_ck.name} is not among its sources",
                "list the base model as a source with the same layer_range",
            )
    participants = [item for item in inputs if item is not base]
    _check_model_count(method, len(participants), where)
    return PlannedSlice(
        participants=participants,
        base=base,
        copy_from=base or participants[0],
        length=out_slice.length,
        parameters=out_slice.parameters,
    )


def _layer_count(ck: Checkpoint) -> int:
    """A model's number of blocks: its config's, else counted from its tensor names."""
    if ck.architecture.num_layers is not None:
        return ck.architecture.num_layers
    indices = [ck.architecture.layer_index(name) for name in ck.names()]
    return max((i for i in indices if i is not None), default=-1) + 1


def _names_by_layer(ck: Checkpoint) -> dict[int, list[str]]:
    layers: dict[int, list[str]] = {}
    for name in ck.names():
        index = ck.architecture.layer_index(name)
        if index is not None:
            layers.setdefault(index, []).append(name)
    return layers


def _tensor_plan(
    plan: MergePlan,
    out_slice: PlannedSlice,
    name: str,
    info: TensorInfo,
    offset: int | None,
    depth: float,
) -> TensorPlan:
    """Output tensor ``name`` of ``out_slice`` (``offset`` into its layers; None outside the
    blocks), its parameters resolved at ``depth``: a model's from its own, the slice's, then
    the recipe's (matched against the model's tensor name, as mergekit does); the global ones
    from the slice's, then the recipe's."""
    pattern = plan.reference.architecture.spec.layer_pattern
    template = out_slice.copy_from.source(name, pattern, offset)
    template_ck = out_slice.copy_from.checkpoint
    if template.tensor not in template_ck:
        raise CheckpointError(
            f"{template_ck.name} lacks {template.tensor}",
            "merge only models of the same architecture (same tensor names)",
        )
    dtype = template_ck.dtype(template.tensor)
    scopes = (out_slice.parameters, plan.config.parameters)
    if not dtype.is_floating_point:
        sources, base_source, model_params = [template], None, []
    else:
        sources = [item.source(name, pattern, offset) for item in out_slice.participants]
        base = out_slice.base
        base_source = base.source(name, pattern, offset) if base is not None else None
        model_params = [
            _resolve_model_params(plan.method, (item.parameters, *scopes), src.tensor, depth)
            for item, src in zip(out_slice.participants, sources, strict=True)
        ]
    return TensorPlan(
        name=name,
        info=info,
        shape=template_ck.shape(template.tensor),
        dtype=dtype,
        depth=depth,
        model_params=model_params,
        params=_resolve_global_params(plan.method, scopes, name, depth),
        sources=sources,
        base_source=base_source,
        copy_from_reference=not dtype.is_floating_point,
    )


def _check_sources(plan: MergePlan, free_rows: bool = False) -> None:
    """Every source tensor of a sliced plan exists with its output's shape (slices may mix
    models of different depths, so names are checked tensor by tensor); with ``free_rows``
    the vocabulary tensors' rows may differ."""
    by_path = {ck.path: ck for ck in plan.inputs}
    problems: list[str] = []
    for tensor in plan.tensors:
        wanted = [*tensor.sources, *([tensor.base_source] if tensor.base_source else [])]
        for source in wanted:
            ck = by_path[source.model]
            if source.tensor not in ck:
                problems.append(f"{ck.name} lacks {source.tensor}")
            elif not _same_shape(
                ck.shape(source.tensor), tensor.shape, free_rows and _is_vocabulary(ck, tensor.name)
            ):
                problems.append(
                    f"{source.tensor}: {ck.name} {list(ck.shape(source.tensor))} vs "
                    f"{list(tensor.shape)} for {tensor.name}"
                )
    if problems:
        raise mismatch_error(
            "the slices' models do not share tensor names and shapes",
            problems,
            "slice only models of the same architecture and width",
        )


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
    models = [(m.model, m.parameters) for m in config.models] + [
        (source.model, source.parameters)
        for out_slice in config.slices or []
        for source in out_slice.sources
    ]
    shared = [("global", config.parameters)] + [
        (f"slice {i}", out_slice.parameters) for i, out_slice in enumerate(config.slices or [])
    ]
    named = [
        (key, where) for where, params in shared for key in params if key not in known_global
    ] + [
        (key, f"model {model}")
        for model, params in models
        for key in params
        if key not in known_model
    ]
    per_model = [where for _, where in named if where.startswith("model ")]
    misplaced = [key for key, where in named if where in per_model and key in known_global]
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


NUMERIC_PARAMETERS = {
    "weight",
    "density",
    "gamma",
    "epsilon",
    "lambda",
    "t",
    "select_topk",
    "scale",
}
FRACTIONS = {"density", "gamma", "select_topk"}  # shares of a tensor's entries
RESCALE_MODES = {"l1", "density", "probability"}


def check_values(method: MergeMethod, tensor: TensorPlan) -> None:
    """The resolved parameters of one tensor are values its method can use, so a bad value
    fails ``--dry-run`` rather than the merge halfway through: the shared rules by name below,
    then the method's own :class:`~dammerge.methods.base.ValueRange` of each parameter."""
    for params in [*tensor.model_params, tensor.params]:
        for key, value in params.items():
            if key in NUMERIC_PARAMETERS and not _is_number(value):
                _bad_value(method, tensor, key, value, "a number")
            if key in FRACTIONS and not 0.0 <= value <= 1.0:
                _bad_value(method, tensor, key, value, "in [0, 1]")
            if key == "rescale_mode" and value not in RESCALE_MODES:
                _bad_value(method, tensor, key, value, f"one of {sorted(RESCALE_MODES)}")
            allowed = method.ranges.get(key)
            if allowed is not None and not allowed.admits(value):
                _bad_value(method, tensor, key, value, allowed.describe())
        if "epsilon" in params and "density" in params:
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


MODEL_COUNT_HINTS = {
    "slerp": "slerp interpolates between base_model and exactly one other model",
    "passthrough": "passthrough copies one model per slice; stack models with several slices",
    "nuslerp": "nuslerp interpolates between exactly two models (base_model optional)",
    "nearswap": "nearswap moves base_model toward exactly one other model",
    "arcee_fusion": "arcee_fusion fuses exactly one other model into base_model",
}


def _check_model_count(method: MergeMethod, count: int, where: str = "") -> None:
    extra = " besides the base" if method.requires_base else ""
    prefix = f"{where}: " if where else ""
    if count < method.min_models:
        raise ConfigError(
            f"{prefix}{method.name} needs at least {method.min_models} model(s){extra}, got {count}"
        )
    if method.max_models is not None and count > method.max_models:
        raise ConfigError(
            f"{prefix}{method.name} takes at most {method.max_models} model(s){extra}, got {count}",
            MODEL_COUNT_HINTS.get(method.name),
        )


def _is_vocabulary(ck: Checkpoint, name: str) -> bool:
    return ck.architecture.is_vocabulary(name)


def _same_shape(a: tuple[int, ...], b: tuple[int, ...], free_rows: bool) -> bool:
    """Equal shapes; with ``free_rows``, equal but for the first dimension."""
    return (len(a) == len(b) and a[1:] == b[1:]) if free_rows else a == b


def check_compatible(
    reference: Checkpoint, others: list[Checkpoint], *, free_rows: bool = False
) -> None:
    """Every model has the reference's tensor names and shapes (all problems listed at once);
    with ``free_rows`` its vocabulary tensors may have another number of rows."""
    problems: list[str] = []
    ref_names = set(reference.names())
    for other in others:
        names = set(other.names())
        for name in sorted(ref_names - names):
            problems.append(f"{other.name} lacks {name}")
        for name in sorted(names - ref_names):
            problems.append(f"{other.name} has extra tensor {name}")
        for name in sorted(ref_names & names):
            free = free_rows and _is_vocabulary(reference, name)
            if not _same_shape(reference.shape(name), other.shape(name), free):
                problems.append(
                    f"{name}: {reference.name} {list(reference.shape(name))} vs "
                    f"{other.name} {list(other.shape(name))}"
                )
    if problems:
        raise mismatch_error(
            "models do not share tensor names and shapes",
            problems,
            "merge only models fine-tuned from the same base (same architecture and vocab)",
        )


def mismatch_error(what: str, problems: list[str], hint: str) -> CheckpointError:
    """One error line listing the first few of many mismatches (all of them are found first)."""
    listed = "; ".join(problems[:MAX_LISTED_MISMATCHES])
    more = len(problems) - MAX_LISTED_MISMATCHES
    suffix = f"; and {more} more" if more > 0 else ""
    return CheckpointError(f"{what}: {listed}{suffix}", hint)


def _resolve_model_params(
    method: MergeMethod, scopes: tuple[dict[str, Any], ...], name: str, depth: float
) -> dict[str, Any]:
    """One model's parameters for tensor ``name``: the first of ``scopes`` (highest precedence
    first) that resolves each, else its default."""
    resolved = {}
    for key, default in method.model_params.items():
        value = None
        for source in scopes:
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
    method: MergeMethod, scopes: tuple[dict[str, Any], ...], name: str, depth: float
) -> dict[str, Any]:
    resolved = {}
    for key, default in method.global_params.items():
        value = None
        for source in scopes:
            if key in source:
                value = resolve_value(source[key], name, depth, key)
                if value is not None:
                    break
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


def _slice_lines(plan: MergePlan) -> list[str]:
    """One line per recipe slice: which output layers come from which source layers."""
    lines, first = [], 0
    for out_slice in plan.config.slices or []:
        last = first + out_slice.length - 1
        sources = ", ".join(
            f"{Path(s.model).name}[{s.layer_range[0]}:{s.layer_range[1]}]"
            for s in out_slice.sources
        )
        lines.append(f"slice       layers {first}-{last} from {sources}")
        first = last + 1
    return lines


def _tokenizer_lines(plan: MergePlan) -> list[str]:
    """The output vocabulary and chat template, when the recipe sets them."""
    lines = []
    vocabulary = plan.vocabulary
    if vocabulary is not None:
        rebuilt = [t.name for t in plan.tensors if t.rows is not None]
        lines.append(
            f"vocabulary  {vocabulary.settings.source}: {vocabulary.size} tokens "
            f"({len(vocabulary.added)} added), {vocabulary.padded_size} rows; rows rebuilt in "
            + (", ".join(rebuilt) or "no tensor (every model already has them)")
        )
    if plan.config.chat_template is not None:
        spec = plan.config.chat_template
        shown = spec if "{" not in spec else "the recipe's Jinja template"
        found = "" if plan.chat_template is not None else " (none found: kept)"
        lines.append(f"chat        {shown}{found}")
    return lines


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
        f"layers      {plan.num_layers}",
        *_slice_lines(plan),
        *_tokenizer_lines(plan),
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

"""Build the merge module: the base's architecture with every mergeable module replaced.

The architecture comes from ``transformers`` itself (``from_config`` on empty weights, so a 70B
skeleton costs nothing), then each module whose tensors the checkpoint classifies as a block
linear, an untied ``lm_head``, an embedding or a norm is swapped for its merge counterpart from
:mod:`dammerge.learned.layers`, filled straight from the memory-mapped checkpoints into one
stacked store per tensor. The result is an ordinary ``nn.Module``: the learned coefficients are
its only trainable parameters; everything else is a frozen parameter or a buffer.

With ``offload="layers"`` the decoder layers' linear stores are built in host memory instead
(pinned when the device is CUDA) and a :class:`~dammerge.learned.offload.LayerStreamer` brings
them to the device two layers at a time; everything else is built on the device as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dammerge.checkpoint.architecture import TensorKind
from dammerge.checkpoint.reader import Checkpoint
from dammerge.errors import CheckpointError
from dammerge.learned.functional import StorePasses
from dammerge.learned.layers import (
    Activation,
    CoefficientScheme,
    Granularity,
    InitSpec,
    MergedLinear,
    MergedParameterModule,
    Parametrization,
    RowGroups,
    Selection,
    TiedHead,
)
from dammerge.learned.offload import (
    HostArena,
    LayerStreamer,
    Offload,
    check_offloadable,
    streamed_bytes,
    streamed_layer,
)

MergeModule = MergedLinear | MergedParameterModule


@dataclass(frozen=True)
class MergeOptions:
    """What is merged and how the coefficients are shaped (see the recipe reference)."""

    granularity: Granularity = "column"
    parametrization: Parametrization = "full"
    activation: Activation = "none"
    init: InitSpec = "uniform"
    clamp: bool = False
    merge_embeddings: bool = False
    merge_norms: bool = False
    include_base: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> MergeOptions:
        """The options of a recipe's ``training:`` block (which holds these under the same
        names, next to the objective and optimisation settings)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class MergedModel(nn.Module):
    """The base architecture computing the merge of N sources; ``teacher(i)`` selects source i."""

    def __init__(
        self,
        model: nn.Module,
        scheme: CoefficientScheme,
        options: MergeOptions,
        sources: list[str],
        base: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.scheme = scheme
        self.options = options
        self.source_names = sources
        self.base_name = base
        self.streamer: LayerStreamer | None = None  # set when the stores are streamed

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) of the merge (or of the selected teacher)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    # -- modes ----------------------------------------------------------------------------
    def merge_modules(self) -> Iterator[tuple[str, MergeModule]]:
        for name, module in self.model.named_modules():
            if isinstance(module, MergedLinear | MergedParameterModule):
                yield name, module

    def teacher(self, index: int) -> contextlib.AbstractContextManager[MergedModel]:
        """Within the block, the module *is* source ``index`` (its own tensors, no arithmetic)."""
        self._check_source(index)
        return self._selecting(index)

    def teachers(self, sources: list[int]) -> contextlib.AbstractContextManager[MergedModel]:
        """Within the block, the batch's rows come in ``len(sources)`` equal groups and group g
        goes through source ``sources[g]`` (every teacher in one forward; the same logits as
        :meth:`teacher` within float rounding)."""
        if not sources:
            raise ValueError("no teachers to run")
        for index in sources:
            self._check_source(index)
        return self._selecting(RowGroups(tuple(sources)))

    def _check_source(self, index: int) -> None:
        if not 0 <= index < len(self.source_names):
            raise IndexError(f"teacher index {index} out of range")

    @contextlib.contextmanager
    def _selecting(self, selection: Selection) -> Iterator[MergedModel]:
        modules = [m for _, m in self.merge_modules()]
        for module in modules:
            module.selected = selection
        try:
            yield self
        finally:
            for module in modules:
                module.selected = None

    def use_passes(self, passes: StorePasses) -> None:
        """Read every merged linear's store with ``passes`` (eager or compiled kernels)."""
        for module in self.model.modules():
            if isinstance(module, MergedLinear | TiedHead):
                module.passes = passes

    # -- coefficients ---------------------------------------------------------------------
    def coefficient_groups(self) -> list[tuple[str, nn.Parameter]]:
        """Every distinct learned coefficient tensor with the name of the tensor it scales.

        Names are checkpoint-style (``model.layers.0.self_attn.q_proj.weight``,
        ``...q_proj.bias`` for bias coefficients, ``model.embed_tokens.weight``); with model
        granularity the one shared tensor is called ``model``.
        """
        groups: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for name, module in self.merge_modules():
            candidates: list[tuple[str, nn.Parameter | None]] = [
                (f"{name}.weight", module.coefficients)
            ]
            if isinstance(module, MergedLinear):
                candidates.append((f"{name}.bias", module.bias_coefficients))
            for tensor_name, param in candidates:
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                label = "model" if self.options.granularity == "model" else tensor_name
                groups.append((label, param))
        return groups

    def coefficient_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.coefficient_groups()]

    def effective_coefficients(self) -> dict[str, torch.Tensor]:
        """Effective (activated) coefficients of the learned participants, float32 on CPU."""
        with torch.no_grad():
            return {
                name: self.scheme.activate(p).detach().float().cpu().clone()
                for name, p in self.coefficient_groups()
            }

    def coefficient_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self.coefficient_groups()}

    @torch.no_grad()
    def load_coefficient_state(self, state: dict[str, torch.Tensor]) -> None:
        groups = dict(self.coefficient_groups())
        if set(groups) != set(state):
            raise CheckpointError(
                "the training checkpoint's coefficients do not match this recipe",
                "resume with the recipe that started the run, or start afresh (resume: false)",
            )
        for name, param in groups.items():
            param.copy_(state[name].to(param.device))

    def participants(self) -> list[str]:
        names = list(self.source_names)
        if self.scheme.n_learned > len(names):
            names.append(f"{self.base_name} (base)")
        return names

    # -- export ---------------------------------------------------------------------------
    def module_for_tensor(self, tensor_name: str) -> tuple[nn.Module | None, str]:
        module_name, _, param = tensor_name.rpartition(".")
        try:
            return self.model.get_submodule(module_name), param
        except AttributeError:
            return None, param

    @torch.no_grad()
    def fold_tensor(
        self, tensor_name: str, store: list[Checkpoint], base: Checkpoint
    ) -> torch.Tensor:
        """The merged value of one checkpoint tensor, recomputed in float32 from the files."""
        module, param = self.module_for_tensor(tensor_name)
        if isinstance(module, TiedHead):
            module, param = module._embedding[0], "weight"
        if isinstance(module, MergedLinear):
            scales = module.scales() if param == "weight" else module.bias_scales()
            assert scales is not None
            return _fold(store, tensor_name, scales.detach().float().cpu())
        if isinstance(module, MergedParameterModule) and module.merged:
            scales = module.scales().detach().float().cpu()
            ones = [1] * (len(base.shape(tensor_name)) - 1)  # scale the last dimension
            return _fold(store, tensor_name, scales.reshape(scales.shape[0], *ones, -1))
        return base.get(tensor_name)


def _to_device(model: nn.Module, device: torch.device, keep_on_host: set[int]) -> None:
    """``model.to(device)`` (the skeleton's own buffers: rotary frequencies) except for the
    parameters in ``keep_on_host`` (streamed stores). Parameters change device in place, so a
    parameter shared by two modules stays shared."""
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in keep_on_host and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def _fold(checkpoints: list[Checkpoint], name: str, scales: torch.Tensor) -> torch.Tensor:
    """``Σ_m scales[m] · tensor_m`` in float32, one source at a time (``scales[m]`` broadcasts
    against the tensor): two tensor-sized buffers however many sources, never a stack."""
    merged = checkpoints[0].get(name).float() * scales[0]
    for checkpoint, scale in zip(checkpoints[1:], scales[1:], strict=True):
        merged.addcmul_(checkpoint.get(name).float(), scale)
    return merged


def load_store(
    checkpoints: list[Checkpoint],
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    arena: HostArena | None = None,
) -> torch.Tensor:
    """One (len(checkpoints), *shape) store, filled in place from the memory-mapped files.

    With ``arena`` the store is built in that host memory (to be streamed) instead of on
    ``device``.
    """
    shape = (len(checkpoints), *checkpoints[0].shape(name))
    if arena is None:
        store = torch.empty(shape, device=device, dtype=dtype)
    else:
        store = arena.empty(shape, dtype)
    for m, ck in enumerate(checkpoints):
        store[m].copy_(ck.get(name))
    return store


class _Builder:
    """Swaps the modules of an empty ``transformers`` skeleton for filled merge modules.

    Tensors are obtained through :meth:`_store` and :meth:`_base_tensor` and the skeleton's
    buffers placed by :meth:`_place`, which a sharded build overrides (empty tensors on the
    meta device, filled per rank after sharding; see :mod:`dammerge.learned.sharded`).
    """

    shares_base_rows = True  # the base's own tensor is a view of its row of a store

    def __init__(
        self,
        base: Checkpoint,
        sources: list[Checkpoint],
        options: MergeOptions,
        device: torch.device,
        dtype: torch.dtype,
        keep_teacher_weights: bool,
        seed: int,
        offload: Offload = "none",
    ) -> None:
        self.base, self.sources, self.options = base, sources, options
        self.device, self.dtype = device, dtype
        self.offload = offload
        self.streamed: list[MergedLinear] = []
        self.arena: HostArena | None = None
        self.keep_teacher_weights = keep_teacher_weights
        self.scheme = CoefficientScheme(
            n_sources=len(sources),
            parametrization=options.parametrization,
            activation=options.activation,
            include_base=options.include_base,
            clamp=options.clamp,
        )
        self.store = sources + ([base] if self.scheme.base_in_store else [])
        if offload == "layers":
            check_offloadable(base)
            total, largest = streamed_bytes(base, len(self.store), dtype)
            self.arena = HostArena(total, largest, pin=device.type == "cuda")
        self.generator = torch.Generator().manual_seed(seed)
        self.shared: nn.Parameter | None = None
        if options.granularity == "model":
            self.shared = self._parameter(1)

    def _parameter(self, width: int) -> nn.Parameter:
        if self.shared is not None:
            return self.shared
        width = width if self.options.granularity == "column" else 1
        raw = self.scheme.initial_raw(
            (self.scheme.n_learned, width), self.options.init, self.generator
        )
        return nn.Parameter(raw.to(self.device))

    def _store(self, tensor_name: str) -> torch.Tensor:
        return load_store(self.store, tensor_name, self.device, self.dtype)

    def _base_tensor(self, tensor_name: str) -> torch.Tensor:
        return self.base.get(tensor_name).to(device=self.device, dtype=self.dtype)

    def _host_store(self, tensor_name: str) -> torch.Tensor:
        """A store to be streamed: built in the host arena (see ``offload``)."""
        return load_store(self.store, tensor_name, self.device, self.dtype, arena=self.arena)

    def _place(self, model: nn.Module) -> None:
        """The skeleton's own buffers (rotary frequencies) on the device; streamed stores stay
        in host memory."""
        if not self.streamed:
            model.to(self.device)
            return
        _to_device(model, self.device, keep_on_host={id(p) for p in self._host_stores()})

    def _tensor_name(self, module_name: str, param: str) -> str:
        name = f"{module_name}.{param}"
        if name not in self.base:
            raise CheckpointError(
                f"the architecture has a tensor {name!r} that {self.base.path} does not hold",
                "the checkpoint's tensor names differ from what transformers builds for this "
                "config; learned merging needs standard Hugging Face names",
            )
        return name

    def linear(self, module_name: str, module: nn.Linear) -> MergedLinear:
        weight_name = self._tensor_name(module_name, "weight")
        layer = streamed_layer(self.base, weight_name)
        streamed = self.arena is not None and layer is not None
        store = self._host_store if streamed else self._store
        weights = store(weight_name)
        biases = bias_coefficients = None
        if module.bias is not None:
            biases = store(self._tensor_name(module_name, "bias"))
            if self.options.granularity == "column":
                raw = self.scheme.initial_raw(
                    (self.scheme.n_learned,), self.options.init, self.generator
                )
                bias_coefficients = nn.Parameter(raw.to(self.device))
        coefficients = self._parameter(int(weights.shape[2]))
        out_features = self.base.shape(weight_name)[0]
        merged = MergedLinear(
            weights, biases, self.scheme, coefficients, bias_coefficients, out_features
        )
        merged.layer = layer
        if streamed:
            self.streamed.append(merged)
        return merged

    def parameter_module(self, module_name: str, module: nn.Module, merge: bool):
        names = [n for n, _ in module.named_parameters(recurse=False)]
        tensor_names = {n: self._tensor_name(module_name, n) for n in names}
        stacks = None
        if merge or self.keep_teacher_weights:
            stacks = {n: self._store(t) for n, t in tensor_names.items()}
        for n, t in tensor_names.items():
            base_row = self.scheme.base_index
            if stacks is not None and base_row is not None and self.shares_base_rows:
                value = stacks[n][base_row]  # a view: the base is held once
            else:
                value = self._base_tensor(t)
            module._parameters[n] = nn.Parameter(value, requires_grad=False)
        width = int(module._parameters[names[0]].shape[-1])
        coefficients = self._parameter(width) if merge else None
        return MergedParameterModule(module, stacks, self.scheme, coefficients)

    def fill_remaining(self, model: nn.Module) -> None:
        """Tensors no merge module covers come from the base, frozen."""
        covered = {
            id(inner)
            for module in model.modules()
            if isinstance(module, MergedLinear | MergedParameterModule)
            for inner in module.modules()
        }
        for module_name, module in model.named_modules():
            if id(module) in covered:
                continue
            for n, param in list(module._parameters.items()):
                if param is not None and param.is_meta:
                    value = self._base_tensor(self._tensor_name(module_name, n))
                    module._parameters[n] = nn.Parameter(value, requires_grad=False)

    def build(self) -> MergedModel:
        config = AutoConfig.from_pretrained(self.base.path)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        embedding = model.get_input_embeddings()
        head = model.get_output_embeddings()
        replacements: dict[str, nn.Module] = {}
        embedding_name = None
        for name, module in model.named_modules():
            if not list(module.parameters(recurse=False)) or (tied and module is head):
                continue
            kind = self._kind(name, module)
            if kind in (TensorKind.LINEAR, TensorKind.LM_HEAD):
                replacements[name] = self.linear(name, module)  # type: ignore[arg-type]
            elif kind == TensorKind.EMBEDDING:
                merge = self.options.merge_embeddings
                replacements[name] = self.parameter_module(name, module, merge)
                if module is embedding:
                    embedding_name = name
            elif kind == TensorKind.NORM:
                merge = self.options.merge_norms
                replacements[name] = self.parameter_module(name, module, merge)
        if tied:
            if embedding_name is None or head is None:
                raise CheckpointError(
                    "tie_word_embeddings is set but the tied embedding was not found",
                    "learned merging supports standard decoder-only Hugging Face models",
                )
            head_name = next(n for n, m in model.named_modules() if m is head)
            replacements[head_name] = TiedHead(replacements[embedding_name])  # type: ignore[arg-type]
        for name, new in replacements.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        self.fill_remaining(model)
        self._place(model)
        model.eval()
        model.config.use_cache = False
        for param in model.parameters():
            param.requires_grad_(False)
        merged = MergedModel(
            model,
            self.scheme,
            self.options,
            [str(ck.path) for ck in self.sources],
            str(self.base.path),
        )
        for param in merged.coefficient_parameters():
            param.requires_grad_(True)
        if self.streamed:
            merged.streamer = LayerStreamer(self.streamed, self.device)
        return merged

    def _host_stores(self) -> list[torch.Tensor]:
        stores = [m.weights for m in self.streamed]
        return stores + [m.biases for m in self.streamed if m.biases is not None]

    def _kind(self, name: str, module: nn.Module) -> TensorKind | None:
        weight_name = f"{name}.weight"
        if weight_name not in self.base:
            return None
        info = self.base.info(weight_name)
        if info.kind in (TensorKind.LINEAR, TensorKind.LM_HEAD):
            if not isinstance(module, nn.Linear):
                raise CheckpointError(
                    f"{weight_name} is not an nn.Linear ({type(module).__name__})",
                    "learned merging supports nn.Linear architectures (Llama, Mistral, Qwen, "
                    "Gemma, Phi-3); merge GPT-2-style Conv1D models with a data-free method",
                )
            return info.kind
        if info.kind == TensorKind.EMBEDDING and isinstance(module, nn.Embedding):
            return info.kind
        if info.kind == TensorKind.NORM:
            return info.kind
        return None


def build_merged_model(
    base: Checkpoint,
    sources: list[Checkpoint],
    options: MergeOptions | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_teacher_weights: bool = True,
    seed: int = 0,
    offload: Offload = "none",
) -> MergedModel:
    """The merge of ``sources`` in ``base``'s architecture, ready to train.

    ``keep_teacher_weights`` keeps every source's embeddings and norms resident so that
    ``teacher(i)`` reproduces source i exactly (needed for on-the-fly teachers); without it
    only what the merge itself uses is loaded. ``seed`` drives ``init: random``. ``offload``
    ``"layers"`` streams the decoder layers' stores from host memory (see
    :mod:`dammerge.learned.offload`).
    """
    builder = _Builder(
        base,
        sources,
        options or MergeOptions(),
        torch.device(device),
        dtype,
        keep_teacher_weights,
        seed,
        offload,
    )
    return builder.build()

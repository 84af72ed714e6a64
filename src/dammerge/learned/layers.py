"""Merge modules: source weights as frozen parameters, the coefficients as float32 parameters.

Each module replaces one module of the base architecture and computes its tensor as a
coefficient-weighted combination of the *stacked* source tensors (the weight store, held once):

- :class:`MergedLinear` — block linears and an untied ``lm_head``, through the custom autograd
  function of :mod:`dammerge.learned.functional` (one matmul, nothing out×in saved);
- :class:`MergedParameterModule` — embeddings and norms: the base's tensor by default, or merged
  per hidden dimension / per element when asked, evaluated with ``torch.func.functional_call`` on
  the original module so architecture details (Gemma's scaled embeddings, norm offsets) stay the
  library's;
- :class:`TiedHead` — the output head of a model with ``tie_word_embeddings``: it borrows the
  embedding's tensors, so tied models stay tied and untied ones are never tied.

Every module has a ``selected`` attribute: ``None`` for the merge, or a source index ``i`` for
*teacher mode* (model i's own tensors, bit for bit, no arithmetic), or :class:`RowGroups` for
*batched teacher mode*: the batch's rows come in equal groups, group g computed with source
``sources[g]``'s tensors, so N teachers run as one forward (batched matrix products; the same
values within float rounding, N times fewer operations to launch). No hooks, no parametrize
magic: ordinary modules whose weight stores are frozen parameters (``requires_grad=False``)
and whose coefficients are trainable ones, so FSDP shards the stores too (it shards
parameters; buffers would be replicated whole on every rank). A sharded store may carry a few
zero rows of padding along its weight axis (FSDP splits only dimension 0 unevenly; see
:mod:`dammerge.learned.sharded`): every module reads its stores through accessors that leave
the padding out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from dammerge.learned.functional import EAGER, StorePasses, merged_linear

Granularity = Literal["model", "layer", "column"]
Parametrization = Literal["full", "task_vectors"]
Activation = Literal["none", "tanh", "sigmoid"]
InitSpec = Literal["uniform", "random"] | float | list[float]
StorePair = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class RowGroups:
    """Batched teacher mode: the batch's rows in ``len(sources)`` equal contiguous groups,
    group g computed with source ``sources[g]``'s own tensors."""

    sources: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.sources)

    def rows_per_group(self, batch: int) -> int:
        if batch % len(self.sources):
            raise ValueError(f"{batch} batch rows do not split into {len(self)} equal groups")
        return batch // len(self.sources)

    def stores(self, store: torch.Tensor) -> torch.Tensor:
        """The groups' rows of a (n_store, ...) store: a view when the sources are consecutive
        (the trainer's usual order), else a gathered copy."""
        first = self.sources[0]
        if self.sources == tuple(range(first, first + len(self.sources))):
            return store.narrow(0, first, len(self.sources))
        index = torch.tensor(self.sources, device=store.device)
        return store.index_select(0, index)

    def per_row(self, store: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, ...) : each row's source tensor (the groups' tensors repeated over rows)."""
        return self.stores(store).repeat_interleave(self.rows_per_group(batch), dim=0)


Selection = int | RowGroups | None


def grouped_linear(
    x: torch.Tensor, groups: RowGroups, weights: torch.Tensor, biases: torch.Tensor | None
) -> torch.Tensor:
    """``x`` (batch, ..., in) through each row group's own linear, as one batched product."""
    rows = groups.rows_per_group(x.shape[0])
    flat = x.reshape(len(groups), -1, x.shape[-1])
    chosen = groups.stores(weights).to(x.dtype).transpose(1, 2)
    if biases is None:
        out = torch.bmm(flat, chosen)
    else:
        out = torch.baddbmm(groups.stores(biases).to(x.dtype)[:, None, :], flat, chosen)
    return out.reshape(len(groups) * rows, *x.shape[1:-1], out.shape[-1])


@dataclass(frozen=True)
class CoefficientScheme:
    """How raw learned coefficients become the per-source scales of the weight store.

    The store holds the N sources, then the base when it takes part. With ``full`` weights the
    merge is ``Σ s_m W_m`` over the learned participants (the base is one when ``include_base``).
    With ``task_vectors`` it is ``W_base + Σ s_i (W_i − W_base)``, computed as the identical
    ``(1 − Σ s_i) W_base + Σ s_i W_i`` so that no task vector is ever materialised.
    """

    n_sources: int
    parametrization: Parametrization = "full"
    activation: Activation = "none"
    include_base: bool = False
    clamp: bool = False

    @property
    def n_learned(self) -> int:
        """Rows of every coefficient tensor."""
        return self.n_sources + int(self.include_base and self.parametrization == "full")

    @property
    def base_in_store(self) -> bool:
        return self.include_base or self.parametrization == "task_vectors"

    @property
    def n_store(self) -> int:
        """Rows of every weight store (sources, then the base if it takes part)."""
        return self.n_sources + int(self.base_in_store)

    @property
    def base_index(self) -> int | None:
        return self.n_sources if self.base_in_store else None

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Learned coefficients -> effective coefficients of the learned participants."""
        if self.activation == "tanh":
            return torch.tanh(raw)
        if self.activation == "sigmoid":
            return torch.sigmoid(raw)
        return raw

    def raw_from_effective(self, value: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`activate`, used to start from given effective values."""
        if self.activation == "tanh":
            return torch.atanh(value)
        if self.activation == "sigmoid":
            return torch.logit(value)
        return value

    def scales(self, raw: torch.Tensor) -> torch.Tensor:
        """(n_learned, d) raw coefficients -> (n_store, d) scales of the weight store."""
        effective = self.activate(raw)
        if self.parametrization == "task_vectors":
            base_scale = 1.0 - effective.sum(0, keepdim=True)
            return torch.cat([effective, base_scale], dim=0)
        return effective

    @torch.no_grad()
    def project_(self, raw: torch.Tensor) -> None:
        """Keep effective coefficients in [0, 1] (AdaMerging's clamp), applied after a step.

        Projection instead of a clamp inside the forward: a clamped forward has zero gradient
        outside the range, so a coefficient that overshoots once would be stuck forever.
        """
        if not self.clamp:
            return
        if self.activation == "none":
            raw.clamp_(0.0, 1.0)
        elif self.activation == "tanh":
            raw.clamp_(min=0.0)
        # sigmoid is in (0, 1) already

    def initial_raw(
        self, shape: tuple[int, ...], init: InitSpec, generator: torch.Generator
    ) -> torch.Tensor:
        """Initial raw coefficients of ``shape`` = (n_learned, d).

        ``uniform``: every effective coefficient 1/n_learned (exactly Model Soups for full
        weights); a number: that effective value everywhere; a list: one effective value per
        learned participant; ``random``: effective values uniform in [0.5/n, 1.5/n].
        """
        n = self.n_learned
        if init == "uniform":
            effective = torch.full(shape, 1.0 / n, dtype=torch.float64)
        elif init == "random":
            effective = (0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)) / n
        elif isinstance(init, int | float):
            effective = torch.full(shape, float(init), dtype=torch.float64)
        else:
            values = torch.tensor([float(v) for v in init], dtype=torch.float64)
            effective = values.reshape(n, *([1] * (len(shape) - 1))).expand(shape).clone()
        return self.raw_from_effective(effective).to(torch.float32)


def frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """A weight store as a parameter that never receives a gradient (None stays None)."""
    return None if tensor is None else nn.Parameter(tensor, requires_grad=False)


def init_error(scheme: CoefficientScheme, init: InitSpec) -> str | None:
    """Why ``init`` cannot be used with ``scheme`` (None if it can)."""
    if isinstance(init, str):
        return None if init in ("uniform", "random") else f"unknown init {init!r}"
    values = [float(init)] if isinstance(init, int | float) else [float(v) for v in init]
    if isinstance(init, list) and len(values) != scheme.n_learned:
        return f"init lists {len(values)} values but there are {scheme.n_learned} participants"
    for v in values:
        if not math.isfinite(v):
            return f"init value {v} is not finite"
        if scheme.activation == "tanh" and not -1.0 < v < 1.0:
            return f"init value {v} is outside tanh's range (-1, 1)"
        if scheme.activation == "sigmoid" and not 0.0 < v < 1.0:
            return f"init value {v} is outside sigmoid's range (0, 1)"
    return None


def _broadcast(scales: torch.Tensor, ndim: int) -> torch.Tensor:
    """(M, d) scales -> shape broadcastable against an (M, ..., d) store of rank ``ndim``."""
    return scales.reshape(scales.shape[0], *([1] * (ndim - 2)), scales.shape[-1])


def _rows(store: torch.Tensor, rows: int) -> torch.Tensor:
    """``store`` (n_store, rows + padding, ...) without its padding rows (itself when none)."""
    return store if store.shape[1] == rows else store.narrow(1, 0, rows)


class MergedLinear(nn.Module):
    """``nn.Linear`` replacement computing ``x · (Σ_m W_m diag(s_m))ᵀ + Σ_m β_m b_m``.

    ``weights`` (n_store, out, in) and ``biases`` (n_store, out) are frozen parameters;
    ``coefficients`` is (n_learned, in) for column granularity or (n_learned, 1) for layer/model
    granularity (for model granularity one parameter object is shared by every module). The
    bias takes one coefficient per model: its own (n_learned,) parameter with column
    granularity, else the layer's (or model's) coefficient. ``out_features`` is given when the
    stores hold padding rows beyond it (a sharded build).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        biases: torch.Tensor | None,
        scheme: CoefficientScheme,
        coefficients: nn.Parameter,
        bias_coefficients: nn.Parameter | None = None,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.in_features = int(weights.shape[2])
        self.out_features = int(weights.shape[1]) if out_features is None else out_features
        self.weights = frozen(weights)
        self.biases = frozen(biases)
        self.coefficients = coefficients
        self.bias_coefficients = bias_coefficients
        self.selected: Selection = None
        self.layer: int | None = None  # the decoder layer it belongs to (None: lm_head)
        # Set by layer streaming: returns this module's stores on the compute device.
        self.store_source: Callable[[MergedLinear], StorePair] | None = None
        self.passes: StorePasses = EAGER  # how the store is read (``training.kernels``)

    def stores(self) -> StorePair:
        """The (weights, biases) stores on the compute device, without padding rows (fetched
        there when streamed)."""
        if self.store_source is None:
            return self.weight_store(), self.bias_store()
        return self.store_source(self)

    def weight_store(self) -> torch.Tensor:
        """The (n_store, out, in) weight store, without padding rows."""
        return _rows(self.weights, self.out_features)

    def bias_store(self) -> torch.Tensor | None:
        """The (n_store, out) bias store (None without biases), without padding rows."""
        return None if self.biases is None else _rows(self.biases, self.out_features)

    def scales(self) -> torch.Tensor:
        """(n_store, in) float32 scales of the weight store."""
        scales = self.scheme.scales(self.coefficients)
        return scales.expand(scales.shape[0], self.in_features)

    def bias_scales(self) -> torch.Tensor | None:
        if self.biases is None:
            return None
        raw = self.bias_coefficients
        if raw is None:
            raw = self.coefficients[:, 0]
        return self.scheme.scales(raw[:, None])[:, 0]

    def merged_bias(self) -> torch.Tensor | None:
        with torch.no_grad():
            scales = self.bias_scales()
            if scales is None:
                return None
            return (self.bias_store().float() * scales[:, None]).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, biases = self.stores()
        if isinstance(self.selected, RowGroups):
            return grouped_linear(x, self.selected, weights, biases)
        if self.selected is not None:
            bias = None if biases is None else biases[self.selected]
            return nn.functional.linear(x, weights[self.selected].to(x.dtype), bias)
        refetch = None if self.store_source is None else self.stores
        return merged_linear(
            x,
            self.scales(),
            weights,
            self.bias_scales(),
            biases,
            refetch=refetch,
            passes=self.passes,
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, store={self.weights.shape[0]}, "
            f"coefficients={tuple(self.coefficients.shape)}"
        )


class MergedParameterModule(nn.Module):
    """An embedding or norm whose parameters come from the base, a merge, or one source.

    ``inner`` is the architecture's own module, holding the base's tensors as frozen
    parameters; ``stacks`` maps each parameter name to its (n_store, *shape) store (absent when
    neither merging nor on-the-fly teachers need it). Merged values scale the last dimension:
    per hidden dimension for embeddings, per element for norms.
    """

    def __init__(
        self,
        inner: nn.Module,
        stacks: dict[str, torch.Tensor] | None,
        scheme: CoefficientScheme,
        coefficients: nn.Parameter | None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.scheme = scheme
        self.stack_names = sorted(stacks) if stacks else []
        # rows of each tensor (a sharded build may pad the stacks beyond them)
        self.stack_rows = {name: int(getattr(inner, name).shape[0]) for name in self.stack_names}
        for name in self.stack_names:
            setattr(self, f"stack_{name}", frozen(stacks[name]))  # type: ignore[index]
        self.coefficients = coefficients
        self.selected: Selection = None
        # Batched teacher mode: whether giving each batch row its own tensor by broadcasting
        # computes what one call per group does (norms: yes; embeddings and modules that check
        # their parameters' shapes: no). Found on first use, then kept.
        self._rows_broadcast: bool | None = None

    @property
    def checking(self) -> bool:
        """Whether the next call makes the batched-teacher first-use check: a data-dependent
        decision, which compiled code (``training.kernels: layers``) leaves to eager code (a
        graph break there would stay in the layer's compiled code for good)."""
        return isinstance(self.selected, RowGroups) and self._rows_broadcast is None

    def stack(self, name: str) -> torch.Tensor:
        if name not in self.stack_names:
            raise RuntimeError(
                "this module holds no source tensors (teacher weights were not kept)"
            )
        return _rows(getattr(self, f"stack_{name}"), self.stack_rows[name])

    @property
    def merged(self) -> bool:
        return self.coefficients is not None

    def scales(self) -> torch.Tensor:
        assert self.coefficients is not None
        return self.scheme.scales(self.coefficients)

    def current(self, name: str) -> torch.Tensor:
        """The value of parameter ``name`` in the current mode (differentiable when merged)."""
        assert not isinstance(self.selected, RowGroups), "batched teachers go through forward"
        if self.selected is not None:
            return self.stack(name)[self.selected]
        if self.coefficients is None:
            return getattr(self.inner, name)
        store = self.stack(name)
        scales = _broadcast(self.scales(), store.dim())
        merged = store[0].to(scales.dtype) * scales[0]
        for m in range(1, store.shape[0]):  # one source at a time: bounded transient memory
            merged = merged + store[m].to(scales.dtype) * scales[m]
        return merged.to(store.dtype)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if isinstance(self.selected, RowGroups):
            return self._grouped_forward(self.selected, args, kwargs)
        if self.selected is None and self.coefficients is None:
            return self.inner(*args, **kwargs)
        values = {name: self.current(name) for name, _ in self.inner.named_parameters()}
        return functional_call(self.inner, values, args, kwargs)

    def _grouped_forward(
        self, groups: RowGroups, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Batched teacher mode: each row group with its source's tensors, in one call where
        broadcasting per-row tensors gives the same result as one call per group."""
        if self._rows_broadcast is False:
            return self._per_group_forward(groups, args, kwargs)
        x = args[0]
        values = self._per_row_values(groups, x)
        if values is None:
            self._rows_broadcast = False
            return self._per_group_forward(groups, args, kwargs)
        try:
            out = functional_call(self.inner, values, args, kwargs)
        except RuntimeError:  # a module that checks its parameters' shapes (layer_norm, ...)
            self._rows_broadcast = False
            return self._per_group_forward(groups, args, kwargs)
        if self._rows_broadcast is None:  # first use: check against one call per group
            expected = self._per_group_forward(groups, args, kwargs)
            self._rows_broadcast = _same_within_rounding(out, expected)
            return out if self._rows_broadcast else expected
        return out

    def _per_row_values(self, groups: RowGroups, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Each parameter as (batch, 1, ..., *shape), broadcasting against ``x`` (batch, ...,
        features); None when a parameter has more dimensions than ``x`` leaves room for."""
        values = {}
        for name, param in self.inner.named_parameters():
            spare = x.dim() - 1 - param.dim()
            if spare < 0 or not x.is_floating_point():
                return None
            rows = groups.per_row(self.stack(name), x.shape[0])
            values[name] = rows.reshape(rows.shape[0], *([1] * spare), *param.shape)
        return values

    def _per_group_forward(
        self, groups: RowGroups, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One call per row group (its rows of the first argument, the source's tensors)."""
        x, rest = args[0], args[1:]
        rows = groups.rows_per_group(x.shape[0])
        outs = []
        for g, source in enumerate(groups.sources):
            values = {name: self.stack(name)[source] for name, _ in self.inner.named_parameters()}
            part = x.narrow(0, g * rows, rows)
            outs.append(functional_call(self.inner, values, (part, *rest), kwargs))
        return torch.cat(outs)


def _same_within_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a few units of rounding of their dtype: a GPU may sum a norm's rows in
    another order for another number of rows, while a module that misuses per-row weights is
    off by far more (or fails)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    tolerance = 8 * torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
    return torch.allclose(a, b, rtol=tolerance, atol=tolerance)


class TiedHead(nn.Module):
    """Output head tied to the input embedding: ``logits = h · Eᵀ`` with E in the current mode.

    It borrows the embedding module (kept in a list, not registered, so every tensor has exactly
    one owner). A merged embedding scales hidden dimensions, which are the head's input columns,
    so the merged head goes through the same memory-saving function as every block linear.
    """

    def __init__(self, embedding: MergedParameterModule) -> None:
        super().__init__()
        self._embedding = [embedding]
        self.passes: StorePasses = EAGER  # how the store is read (``training.kernels``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self._embedding[0]
        if isinstance(emb.selected, RowGroups):
            return grouped_linear(x, emb.selected, emb.stack("weight"), None)
        if emb.selected is None and emb.merged:
            scales = emb.scales().expand(-1, x.shape[-1])
            return merged_linear(x, scales, emb.stack("weight"), passes=self.passes)
        return nn.functional.linear(x, emb.current("weight").to(x.dtype))

"""Layer streaming (``training.offload: layers``): exact DAM with the weight stores in host memory.

The N-way weight stores of the decoder layers' linears are most of what a learned merge holds
(three 7B sources: ~40 GiB in bf16). With streaming they live in host memory (a
:class:`HostArena`, pinned on CUDA so that copies run asynchronously) and at most **two** decoder
layers' stores are on the compute device at any time: the layer computing now and the one
predicted next, whose copy is started while the current one computes (on CUDA on a side stream,
joined by an event; on CPU the same code path makes a plain copy, so the CPU tests exercise it).
Everything outside the decoder layers (the embeddings, the final norm, an untied ``lm_head``)
and the layers' small norm vectors stay on the device.

Nothing is approximated: the merged-linear function does not keep a store for backward; it
fetches the layer's stores again through :meth:`LayerStreamer.stores` (see
:mod:`dammerge.learned.functional`). The same values meet the same kernels in the same order, so
coefficients after training are bit for bit those of a run with resident stores on the same
device and dtype. Under gradient checkpointing a layer's recomputation fetches its stores like
its first forward did.

Prediction of the next layer needs no hook on the model: the order in which layers ask for
their stores tells the direction. Ascending means a forward pass (next: the layer above; after
the last layer, the one below it when gradients are being recorded, since backward comes next,
else the first layer, since another forward pass comes next); descending means backward (next:
the layer below; after the first layer, the second, which the next forward pass needs right
after the first). A wrong prediction costs one copy, never a wrong result: a layer that is not
resident is fetched synchronously when asked for.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from dammerge.checkpoint.architecture import TensorKind
from dammerge.checkpoint.reader import Checkpoint
from dammerge.errors import ConfigError
from dammerge.learned.layers import MergedLinear, StorePair

Offload = Literal["none", "layers"]
ResidencyObserver = Callable[[tuple[int, ...]], None]


def streamed_layer(base: Checkpoint, weight_name: str) -> int | None:
    """The decoder layer whose stores ``weight_name`` belongs to when streamed (None: resident).

    Block linears (and their biases) are streamed; the output head never is.
    """
    info = base.info(weight_name)
    return info.layer if info.kind == TensorKind.LINEAR else None


def check_offloadable(base: Checkpoint) -> None:
    """``offload: layers`` needs decoder layers whose linears it recognises; say so if not."""
    if any(streamed_layer(base, name) is not None for name in base.names()):
        return
    model_type = base.config.get("model_type") or "unknown"
    raise ConfigError(
        f"training.offload: layers needs decoder layers, but no block linear of {base.path} "
        f"(model_type {model_type}) was recognised as part of one",
        "use training.offload: none, or a standard decoder-only Hugging Face architecture",
    )


def streamed_bytes(base: Checkpoint, n_store: int, dtype: torch.dtype) -> tuple[int, int]:
    """(total, largest) bytes of the stores ``offload: layers`` keeps in host memory: every
    decoder-layer linear's weight and bias, ``n_store`` copies each, in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = []
    for name in base.names():
        if streamed_layer(base, name) is None:
            continue
        sizes.append(math.prod(base.shape(name)))
        bias = name.removesuffix(".weight") + ".bias"
        if name.endswith(".weight") and bias in base:
            sizes.append(math.prod(base.shape(bias)))
    sizes = [n * n_store * itemsize for n in sizes]
    return sum(sizes), max(sizes, default=0)


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _power_of_two_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


class HostArena:
    """Host memory for the streamed stores, handed out from a few large segments.

    PyTorch's pinned-memory allocator rounds every allocation up to a power of two, which for
    stores of a 70B model (1.4 GB each) would waste a third of the host memory. The arena asks
    only for power-of-two segments (nothing to round) and places each store, as a view, in the
    first segment with room. Segments are ``segment_bytes`` (16 times the largest store, at
    least :attr:`MIN_SEGMENT`) until what remains to place is smaller: then the largest power of
    two not above it, so the last segments follow the remainder down instead of leaving most
    of one big segment empty. Page-locked when ``pin`` (a CUDA device), ordinary memory on a
    CPU, through the same code.
    """

    MIN_SEGMENT = 256 * 2**20
    ALIGN = 512  # bytes: every view starts at a multiple (any dtype's alignment, DMA-friendly)

    def __init__(
        self, total_bytes: int, largest_bytes: int, pin: bool, segment_bytes: int | None = None
    ) -> None:
        self.pin = pin
        self.remaining = total_bytes + self.ALIGN * 2**10  # alignment padding of ~1k stores
        default = _power_of_two_at_least(max(16 * largest_bytes, self.MIN_SEGMENT))
        self.segment_bytes = segment_bytes or default
        self.segments: list[torch.Tensor] = []
        self._used: list[int] = []

    @property
    def reserved(self) -> int:
        """Bytes of host memory the segments hold."""
        return sum(segment.numel() for segment in self.segments)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``shape`` tensor of ``dtype`` inside a segment."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        index = next(
            (i for i, used in enumerate(self._used) if used + size <= self.segments[i].numel()),
            None,
        )
        if index is None:
            index = self._new_segment(size)
        start = self._used[index]
        self._used[index] += size
        self.remaining = max(0, self.remaining - size)
        view = self.segments[index][start : start + nbytes]
        return view.view(dtype).view(shape)

    def _new_segment(self, size: int) -> int:
        wanted = min(self.segment_bytes, _power_of_two_at_most(max(self.remaining, 1)))
        segment_size = max(_power_of_two_at_least(size), wanted)
        self.segments.append(torch.empty(segment_size, dtype=torch.uint8, pin_memory=self.pin))
        self._used.append(0)
        return len(self.segments) - 1


@dataclass
class _Slot:
    """A device buffer holding one layer's stores at a time.

    ``released`` (CUDA) is recorded on the compute stream when its layer is evicted: the copy
    of the next layer into this buffer waits for it, so no kernel still reading the old layer
    sees its stores overwritten.
    """

    buffer: torch.Tensor
    layer: int | None = None
    released: torch.cuda.Event | None = None


@dataclass
class _Resident:
    """One layer's stores on the compute device (views into a slot); ``ready`` is the copy's
    CUDA event, joined by the compute stream before the layer's first use."""

    slot: _Slot
    stores: dict[int, StorePair] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None


_Span = tuple[int, torch.Size, torch.dtype]  # offset in bytes, shape, dtype


class LayerStreamer:
    """Keeps at most two decoder layers' stores on ``device`` and prefetches the next one.

    Each streamed :class:`MergedLinear` gets ``store_source`` pointing here; its ``weights`` and
    ``biases`` parameters stay in host memory. The device holds two buffers ("slots"), each the
    size of the largest layer's stores, allocated at the first fetch: a layer's stores are
    copied into a free slot, so streaming allocates nothing per step (no allocator churn on a
    CPU, an exact two-layer footprint everywhere). ``observe`` registers a callback that
    receives the resident layers after every change (tests count them).
    """

    SLOTS = 2
    ALIGN = 512  # bytes between the stores inside a slot

    def __init__(self, modules: Iterable[MergedLinear], device: torch.device) -> None:
        self.device = torch.device(device)
        self._layers: dict[int, list[MergedLinear]] = {}
        for module in modules:
            if module.layer is None:
                raise ValueError("only decoder-layer linears are streamed")
            self._layers.setdefault(module.layer, []).append(module)
        if not self._layers:
            raise ValueError("no decoder-layer linears to stream")
        self._order = sorted(self._layers)
        self._position = {layer: i for i, layer in enumerate(self._order)}
        self._spans = {layer: self._layout(layer) for layer in self._order}
        self.slot_bytes = max(end for _, end in self._spans.values())
        self._slots: list[_Slot] = []
        self._resident: dict[int, _Resident] = {}
        self._current: int | None = None
        self._observers: list[ResidencyObserver] = []
        self.fetches = 0  # layer copies made (the prefetched ones included)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for layer_modules in self._layers.values():
            for module in layer_modules:
                module.store_source = self.stores

    # -- what the modules call ------------------------------------------------------------
    def stores(self, module: MergedLinear) -> StorePair:
        """``module``'s (weights, biases) on the device; its layer becomes the current one."""
        assert module.layer is not None
        self.acquire(module.layer)
        return self._resident[module.layer].stores[id(module)]

    def acquire(self, layer: int) -> None:
        """Make ``layer`` resident and current; start fetching the layer predicted next."""
        if layer == self._current and layer in self._resident:
            return
        upcoming = self._predict(layer)
        self._current = layer
        keep = {layer} if upcoming is None else {layer, upcoming}
        for other in [r for r in self._resident if r not in keep]:
            self._evict(other)  # before fetching: never more than two
        if layer not in self._resident:
            self._resident[layer] = self._fetch(layer)
        self._join(self._resident[layer])
        if upcoming is not None and upcoming not in self._resident:
            self._resident[upcoming] = self._fetch(upcoming)
        self._notify()

    def observe(self, callback: ResidencyObserver) -> None:
        """Call ``callback(resident_layers)`` after every change of the resident set."""
        self._observers.append(callback)

    def resident_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self._resident))

    def release(self) -> None:
        """Drop every device copy and hand the slots' memory back (e.g. before export)."""
        for layer in list(self._resident):
            self._evict(layer)
        self._slots.clear()
        self._current = None
        self._notify()

    @property
    def layers(self) -> list[int]:
        return list(self._order)

    def layer_bytes(self, layer: int) -> int:
        """Bytes of one layer's stores (what each resident layer costs on the device)."""
        total = 0
        for module in self._layers[layer]:
            for store in (module.weight_store(), module.bias_store()):
                if store is not None:
                    total += store.numel() * store.element_size()
        return total

    # -- internals ------------------------------------------------------------------------
    def _layout(self, layer: int) -> tuple[dict[int, tuple[_Span, _Span | None]], int]:
        """Where each store of ``layer`` lies inside a slot, and the bytes the layer needs."""
        spans: dict[int, tuple[_Span, _Span | None]] = {}
        offset = 0

        def place(tensor: torch.Tensor) -> _Span:
            nonlocal offset
            span = (offset, tensor.shape, tensor.dtype)
            offset += -(-tensor.numel() * tensor.element_size() // self.ALIGN) * self.ALIGN
            return span

        for module in self._layers[layer]:
            weights = place(module.weight_store())
            bias_store = module.bias_store()
            biases = None if bias_store is None else place(bias_store)
            spans[id(module)] = (weights, biases)
        return spans, offset

    def _predict(self, layer: int) -> int | None:
        """The layer most likely asked for after ``layer`` (see the module docstring)."""
        position = self._position[layer]
        last = None if self._current is None else self._position[self._current]
        step = -1 if last == position + 1 else 1
        upcoming = position + step
        if 0 <= upcoming < len(self._order):
            return self._order[upcoming]
        if len(self._order) == 1:
            return None
        if step < 0:  # backward reached the first layer: the next pass starts here, then ...
            return self._order[1]
        return self._order[-2] if torch.is_grad_enabled() else self._order[0]

    def _free_slot(self) -> _Slot:
        for slot in self._slots:
            if slot.layer is None:
                return slot
        if len(self._slots) >= self.SLOTS:
            raise RuntimeError("every slot holds a resident layer")  # acquire evicts first
        buffer = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
        if self._copy_stream is not None:
            buffer.record_stream(self._copy_stream)  # written there: freed only after its copies
        self._slots.append(_Slot(buffer))
        return self._slots[-1]

    def _fetch(self, layer: int) -> _Resident:
        """Start copying ``layer``'s stores into a free slot (asynchronously on CUDA)."""
        self.fetches += 1
        slot = self._free_slot()
        slot.layer = layer
        resident = _Resident(slot)
        spans, _ = self._spans[layer]
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None and slot.released is not None:
                stream.wait_event(slot.released)
            for module in self._layers[layer]:
                weight_span, bias_span = spans[id(module)]
                weights = _copy_into(slot.buffer, weight_span, module.weight_store())
                biases = None
                bias_store = module.bias_store()
                if bias_span is not None and bias_store is not None:
                    biases = _copy_into(slot.buffer, bias_span, bias_store)
                resident.stores[id(module)] = (weights, biases)
            if stream is not None:
                resident.ready = torch.cuda.Event()
                resident.ready.record(stream)
        return resident

    def _evict(self, layer: int) -> None:
        slot = self._resident.pop(layer).slot
        slot.layer = None
        if self._copy_stream is not None:  # kernels reading it are queued before this point
            slot.released = torch.cuda.Event()
            slot.released.record(torch.cuda.current_stream(self.device))

    def _join(self, resident: _Resident) -> None:
        """Make the compute stream wait for the layer's copy (once)."""
        if resident.ready is None:
            return
        torch.cuda.current_stream(self.device).wait_event(resident.ready)
        resident.ready = None

    def _notify(self) -> None:
        resident = self.resident_layers()
        for callback in self._observers:
            callback(resident)


def _copy_into(buffer: torch.Tensor, span: _Span, source: torch.Tensor) -> torch.Tensor:
    """Copy a host store into its place in a slot; returns the slot's view of it."""
    offset, shape, dtype = span
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    view = buffer[offset : offset + nbytes].view(dtype).view(shape)
    return view.copy_(source.detach(), non_blocking=buffer.device.type == "cuda")

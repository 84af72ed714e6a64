"""Compiled passes over the weight stores (``training.kernels``).

Every step reads each merged linear's (N, out, in) store three times: to form the merged weight
in forward, again in backward, and for the coefficient gradients ``column-sums(G ⊙ W_m)`` with
``G = gᵀx``. Written with torch operations (:data:`dammerge.learned.functional.EAGER`) each pass
is about N elementwise kernels with float32 temporaries between them; on a GPU those launches
and the bytes they move cost several times the layer's matrix products. ``torch.compile``
(inductor: Triton on a GPU, C++ on a CPU) turns each pass into one loop over the store: read
the N tiles, accumulate in float32, write once (the merged weight straight in the compute
dtype; the N column sums as one (N, in) result). The products stay cuBLAS/BLAS matrix
products: the merged weight is formed once and then multiplied, and ``G`` is one product.

Compiled once per run, not per step: the passes see only weight-shaped tensors, ``(N, in)``,
``(N, out, in)`` and ``G`` (out, in), never the number of tokens, and they are compiled with
dynamic sizes, so every layer shape and every sequence length share one compiled pass per
number of sources and dtype.

``training.kernels``:

- ``eager``: torch operations (the CPU path is cache-blocked and reuses its buffers);
- ``compiled``: the compiled passes, on any device;
- ``layers``: every decoder layer compiled whole (its norms, attention, activations and the
  merged linears' passes, forward and backward), the compiled passes elsewhere (the head).
  Where the step is launch-bound this removes most of the host's work: a merged linear costs
  the host two calls into compiled code and a custom autograd function per step, a compiled
  layer one call per pass for all of its linears. Compiling takes longer before the first step
  (once per number of sources, dtype and mode; the layers share their graphs), and resident
  stores only: with ``offload: layers`` or ``distributed: shard`` the layers stay uncompiled
  (one line says so) and the passes are compiled;
- ``auto`` (default): compiled on a CUDA GPU where Triton is installed, eager elsewhere. On a
  CPU the eager passes are already one cache-blocked sweep per source over data that stays in
  cache, and compiling costs tens of seconds per (N, dtype) before the first step, more than
  a short CPU run saves.

When compiling is not possible (no Triton, no C++ compiler, an unsupported Python) or fails,
the passes fall back to eager ones for the rest of the process, with one warning line: the
results are the same within float rounding either way.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch

from dammerge.learned.functional import EAGER, StorePasses, accumulation_dtype
from dammerge.terminal import print_lines

KernelChoice = Literal["auto", "compiled", "eager", "layers"]


def merge_pass(scales: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_m weights[m] · diag(scales[m])`` accumulated in the scales' precision, cast to
    ``dtype``: written source by source so that the compiler emits one pointwise loop that
    reads the N tiles and writes the result once."""
    acc = scales.dtype
    merged = weights[0].to(acc) * scales[0]
    for m in range(1, weights.shape[0]):
        merged = merged + weights[m].to(acc) * scales[m]
    return merged.to(dtype)


def column_pass(outer: torch.Tensor, weights: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[column-sums(outer ⊙ weights[m]) for m]`` as one (N, in) tensor in ``acc``: N sums
    over the same rows, which the compiler fuses into one reduction reading ``outer`` once."""
    wide = outer.to(acc)
    return torch.stack([(wide * weights[m].to(acc)).sum(0) for m in range(weights.shape[0])])


def linear_pass(
    x: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A merged linear's forward as one compiled call: the merge pass, then the product (an
    extern BLAS/cuBLAS call inside the compiled code, not fused into the merge)."""
    return torch.nn.functional.linear(x, merge_pass(scales, weights, x.dtype), bias)


def backward_pass(
    g2: torch.Tensor,
    x2: torch.Tensor,
    scales: torch.Tensor,
    weights: torch.Tensor,
    need_x: bool,
    need_scales: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A merged linear's backward as one compiled call: ``g2 · merged`` and the column
    gradients of ``G = g2ᵀ x2``, the two products extern, the two store passes fused."""
    grad_x = g2 @ merge_pass(scales, weights, g2.dtype) if need_x else None
    grads = column_pass(g2.transpose(0, 1) @ x2, weights, scales.dtype) if need_scales else None
    return grad_x, grads


_fallback_reason: str | None = None


def fall_back(reason: str) -> None:
    """Use eager passes from now on in this process; say so once, in one line."""
    global _fallback_reason
    if _fallback_reason is None:
        first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
        print_lines(
            [f"warning: compiled merge kernels unavailable ({first_line}); using eager kernels"],
            style="yellow",
        )
    _fallback_reason = reason


def _compile_error(exc: BaseException) -> str:
    """What went wrong, from the innermost cause (torch.compile wraps the compiler's error)."""
    while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None:
        exc = inner
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def fallback_reason() -> str | None:
    """Why the compiled passes were given up in this process (None: they were not)."""
    return _fallback_reason


def _allocation_failed(exc: BaseException) -> bool:
    """Out of memory is the step's failure, not the compiler's: the trainer reports it."""
    from dammerge.learned.train import out_of_memory  # the trainer imports this module

    return out_of_memory(exc)


class CompiledPasses(StorePasses):
    """The store passes compiled with ``torch.compile`` (dynamic sizes), eager as fallback.

    A layer's forward and its backward are each one compiled call (:func:`linear_pass`,
    :func:`backward_pass`, which trace :func:`merge_pass` and :func:`column_pass`): every call
    into compiled code costs the host tens of microseconds of guards and wrappers, about what a
    small layer's kernels take on a GPU. The eager ``merged`` and ``column_grads`` stay the
    fallback.
    ``backend`` is ``torch.compile``'s (tests count compilations with a counting backend).
    """

    name = "compiled"

    def __init__(self, backend: Any = "inductor") -> None:
        def compiled(fn: Any) -> Any:
            return torch.compile(fn, dynamic=True, backend=backend)

        self._linear = compiled(linear_pass)
        self._backward = compiled(backward_pass)

    def linear(
        self,
        x: torch.Tensor,
        scales: torch.Tensor,
        weights: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        if _fallback_reason is None:
            try:  # tokens as one dimension: batch or length 1 would specialise a graph
                rows = _plain(x.reshape(-1, x.shape[-1]))
                y = self._linear(rows, _wide(scales), _plain(weights), bias)
                # not a view: the trainer writes the logits' gradient over a layer's output
                return _plain(y.reshape(*x.shape[:-1], y.shape[-1]))
            except Exception as exc:
                _give_up_unless_out_of_memory(exc)
        return super().linear(x, scales, weights, bias)

    def backward(
        self,
        g2: torch.Tensor,
        x2: torch.Tensor,
        scales: torch.Tensor,
        weights: torch.Tensor,
        need_x: bool,
        need_scales: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if _fallback_reason is None and (need_x or need_scales):
            try:
                grad_x, grads = self._backward(
                    _plain(g2), _plain(x2), _wide(scales), _plain(weights), need_x, need_scales
                )
                return grad_x, None if grads is None else grads.to(scales.dtype)
            except Exception as exc:
                _give_up_unless_out_of_memory(exc)
        return super().backward(g2, x2, scales, weights, need_x, need_scales)


def _give_up_unless_out_of_memory(exc: BaseException) -> None:
    """A compiled call failed: use eager passes from now on (they are exact), unless it ran
    out of memory, which is the step's failure, not the compiler's: re-raised."""
    if _allocation_failed(exc):
        raise exc
    fall_back(_compile_error(exc))


def _wide(scales: torch.Tensor) -> torch.Tensor:
    """Detached and contiguous in the accumulation dtype: one compiled graph whatever the
    coefficients' granularity (an expanded (N, 1) tensor would compile a graph of its own)."""
    return scales.detach().to(accumulation_dtype(scales)).contiguous()


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a plain tensor, neither a parameter nor a view. Dynamo gives parameters
    static shapes whatever ``dynamic`` says (``force_parameter_static_shapes``), so frozen stores
    would compile once per layer shape and, past its recompile limit (8), leave the remaining
    shapes to run uncompiled; and it guards a view's sizes against its base's, which differ
    from layer to layer."""
    return tensor.detach()


_compiled: CompiledPasses | None = None


class CompiledLayerForward:
    """A decoder layer's ``forward`` compiled whole, its own eager ``forward`` as fallback.

    Installed as the module's ``forward`` attribute (``nn.Module.__call__`` and the library's
    checkpointing wrapper call it as usual). The merged linears inside are traced with it:
    their autograd function's forward and backward become part of the layer's compiled forward
    and backward graphs. Every layer calls the same compiled entry (:func:`_layer_compiler`).
    """

    def __init__(self, module: torch.nn.Module, backend: Any = "inductor") -> None:
        self.eager = module.forward
        self.compiled = _layer_compiler(backend)
        # modules that make a first-use check: the layer runs eager while one is due
        self.checked = [m for m in module.modules() if hasattr(m, "checking")]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _fallback_reason is None and not any(m.checking for m in self.checked):
            try:
                return self.compiled(self.eager, *args, **kwargs)
            except Exception as exc:
                _give_up_unless_out_of_memory(exc)
        return self.eager(*args, **kwargs)


def _call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``: compiled once, the one compiled entry of every layer."""
    return function(*args, **kwargs)


_layer_compilers: dict[Any, Any] = {}
LAYER_RECOMPILE_LIMIT = 64  # compiled variants of the layer entry kept per process (see below)


def _layer_compiler(backend: Any) -> Any:
    """One ``torch.compile`` per backend, shared by every layer of every model in the process.

    Dynamo keeps one cache per code object (a layer class's ``forward``) with at most
    ``recompile_limit`` (8) entries, and an entry serves only the ``torch.compile`` call that
    made it: a call per layer would compile each layer again and, past the eighth (merged and
    teacher forwards count apart), leave the rest uncompiled without a word. Through one call,
    layers of one shape share their entries. A model still takes about three (the teachers'
    forward, the first layer's input without gradient, the rest), and the stores' number of
    sources is a static size (they are parameters): trainings of several N in one process
    (experiments, benchmarks) need more than 8.
    """
    if backend not in _layer_compilers:
        _layer_compilers[backend] = torch.compile(
            _call,
            dynamic=True,
            backend=BackwardWithForward(backend),
            recompile_limit=LAYER_RECOMPILE_LIMIT,
        )
    return _layer_compilers[backend]


class BackwardWithForward:
    """A ``torch.compile`` backend that compiles each graph's backward with its forward.

    AOTAutograd otherwise compiles a backward it could not compile up front at the first
    backward call, where a compiler failure would break the step's ``backward()``; compiled
    here, the failure surfaces in the layer's forward call, which falls back to eager. Only
    compiling costs anything (the backend is called once per graph), no step does.
    """

    def __init__(self, backend: Any = "inductor") -> None:
        self.backend = backend

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any):
        import torch._dynamo
        from torch._functorch import config

        backend = self.backend
        compiler = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        with config.patch(force_non_lazy_backward_lowering=True):
            return compiler(graph, example_inputs, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules ``transformers`` makes checkpointable."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(
    model: torch.nn.Module, backend: Any = "inductor", *, enabled: bool = True
) -> int:
    """Compile every decoder layer of ``model`` whole (``training.kernels: layers``), or with
    ``enabled=False`` give them back their own forward; returns how many layers changed. A
    layer already in the asked state is left as it is (its compiled code stays cached)."""
    changed = 0
    for layer in decoder_layers(model):
        compiled = isinstance(layer.__dict__.get("forward"), CompiledLayerForward)
        if enabled and not compiled:
            layer.forward = CompiledLayerForward(layer, backend)
        elif compiled and not enabled:
            del layer.forward  # the class's forward again
        else:
            continue
        changed += 1
    return changed


def compile_give_ups() -> int:
    """How many times dynamo gave up compiling a function in this process (its recompile
    limit): those calls run their eager code from then on, which only dynamo's log says."""
    from torch._dynamo.utils import counters

    return sum(
        count
        for reason, count in counters["unimplemented"].items()
        if reason.startswith("Dynamo recompile limit exceeded")
    )


def compiled_passes() -> CompiledPasses:
    """The process's compiled passes (one instance: its compiled code serves every model)."""
    global _compiled
    if _compiled is None:
        _compiled = CompiledPasses()
    return _compiled


def compile_unavailable(device: torch.device) -> str | None:
    """Why the passes cannot be compiled for ``device`` (None: nothing known against it).

    A missing C++ compiler on a CPU shows only when compiling; that falls back too.
    """
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if torch.cuda.get_device_capability(device) < (7, 0):
            return "Triton needs a GPU of compute capability 7.0 or newer"
    return None


def store_passes(choice: KernelChoice, device: torch.device | str) -> StorePasses:
    """The passes ``training.kernels: choice`` gives on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if choice == "eager" or _fallback_reason is not None:
        return EAGER
    if choice == "layers":  # the compiled passes beside the compiled layers (the head)
        choice = "compiled"
    if choice == "auto" and device.type != "cuda":
        return EAGER
    reason = compile_unavailable(device)
    if reason is None:
        return compiled_passes()
    fall_back(reason)
    return EAGER

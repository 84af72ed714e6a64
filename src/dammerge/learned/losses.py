"""Objectives and regularisers of learned merging, as small pure functions.

Token-level objectives take logits ``(batch, seq, vocab)`` and a boolean ``mask`` ``(batch,
seq)`` of the *prediction positions* that count (padding, and optionally the prompt, are
excluded); they return the mean over counted positions. Only those positions are gathered, and
the float32 work is done in chunks of positions, so the fp32 copies of a 128k-vocabulary
distribution exist for one chunk at a time, in forward and backward: forward KL (DAM's
objective) and its top-K form are hand-written autograd functions that loop over small chunks
and save only their inputs; the other objectives run chunks under activation checkpointing.

Definitions (``p`` = softmax(teacher / T), ``q`` = softmax(merged / T)):

- ``kl``: ``T²`` times :func:`dammerge.scoring.divergence.kl_to_teacher`, the KL definition shared
  with evolution and the evaluator. Forward: ``T² · Σ_v p log(p / q)`` (the reference code's
  KL(teacher‖merged), T = 2); reverse: ``T² · Σ_v q log(q / p)``. Forward KL runs through the
  hand-written chunked kernels below (tested against the shared definition); reverse KL calls
  the shared definition chunk by chunk;
- ``mse``: mean over the vocabulary of (merged − teacher)² logits;
- ``entropy``: ``−Σ_v q log q`` of the merged distribution at T = 1 (AdaMerging; no teacher);
- top-K teachers (values and vocabulary indices of the teacher's K largest logits): ``p`` is the
  teacher renormalised over its K entries. Forward KL uses the merged model's full-vocabulary
  ``log q`` at those entries; reverse KL renormalises ``q`` over the same K entries (reverse KL
  against a distribution with zeros elsewhere would be infinite). MSE compares the K entries.

Regularisers act on the effective coefficients, one ``(participants, d)`` tensor per group:

- ``cosine``: per group, the mean cosine similarity over pairs of participants; the mean over
  groups (the reference code's reduction, so λ_cos does not scale with depth);
- ``l1`` = Σ|c| and ``l2`` = Σc² over every coefficient (the paper's sums: the gradient per
  coefficient is λ whatever the model size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dammerge.scoring.divergence import kl_to_teacher

CHUNK_ELEMENTS = 2**25  # float32 elements per chunk of positions × vocabulary on a CPU (128 MiB)
FUSED_CHUNK_ELEMENTS = 2**20  # float32 elements per chunk inside the fused KL functions (4 MiB)
CUDA_CHUNK_ELEMENTS = 2**26  # on a GPU: a source's 2,048 positions of a 32k vocabulary at once
FUSED_BYTES_PER_ELEMENT = 16  # a fused KL chunk's float32 temporaries (scaled logits, p, q)
CHECKPOINTED_BYTES_PER_ELEMENT = 32  # a checkpointed chunk's, recomputed under autograd
CHUNK_SHARE_OF_FREE = 4  # a chunk's temporaries take at most a quarter of free device memory


def free_device_bytes(device: torch.device) -> int:
    """Bytes a CUDA device can still hand out: free to the driver plus cached by torch."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def chunk_elements(device: torch.device, cpu_elements: int, bytes_per_element: int) -> int:
    """Float32 elements per chunk of (positions × vocabulary) in the losses on ``device``.

    On a CPU, ``cpu_elements`` (the chunks of the fused functions stay in cache between their
    passes). On a GPU each chunk costs a dozen kernel launches whatever its size, so chunks are
    :data:`CUDA_CHUNK_ELEMENTS` (a 7B model's 2,048 positions of a 32k vocabulary: one chunk
    per source), fewer where their temporaries (``bytes_per_element`` each) would take more
    than a quarter of the free device memory, never fewer than ``cpu_elements``.
    """
    if device.type != "cuda":
        return cpu_elements
    fits = free_device_bytes(device) // (CHUNK_SHARE_OF_FREE * bytes_per_element)
    return int(max(cpu_elements, min(CUDA_CHUNK_ELEMENTS, fits)))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits are widened; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def select_positions(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, V) -> (n, V): the counted positions only."""
    if mask is None:
        return logits.reshape(-1, logits.shape[-1])
    return logits[mask]


def _chunked_mean(
    fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], chunk: int | None
) -> torch.Tensor:
    """Mean over rows of ``fn(*row_chunks)`` (which returns per-row values), chunk by chunk."""
    rows = tensors[0].shape[0]
    if rows == 0:
        return tensors[0].sum() * 0.0  # keeps the graph; nothing to count
    width = max(t.shape[-1] for t in tensors)
    if chunk is None:
        elements = chunk_elements(tensors[0].device, CHUNK_ELEMENTS, CHECKPOINTED_BYTES_PER_ELEMENT)
        chunk = max(1, elements // max(width, 1))
    total = tensors[0].new_zeros((), dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    for start in range(0, rows, chunk):
        parts = [t[start : start + chunk] for t in tensors]
        if needs_grad and rows > chunk:
            values = checkpoint(fn, *parts, use_reentrant=False)
        else:
            values = fn(*parts)
        total = total + values.sum()
    return total / rows


def _rows_per_chunk(width: int, chunk: int | None, device: torch.device) -> int:
    if chunk is not None:
        return chunk
    elements = chunk_elements(device, FUSED_CHUNK_ELEMENTS, FUSED_BYTES_PER_ELEMENT)
    return max(1, elements // max(width, 1))


def _spans(rows: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


def _softmax_lse(x: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(softmax(x/T), logsumexp(x/T), x/T)`` per row, float32 or wider (chunk temporaries).

    Built on the softmax kernel, whose exponential costs less than ``torch.exp`` and which
    fuses max, exp, sum and scaling in one call: on CPU these row-wise ops are memory- and
    exp-bound, and this formulation took ~20 % less time than the same terms from separate
    passes. The log-sum-exp comes from the row's largest probability: ``p_max = exp(x_max/T −
    lse)``, so ``lse = x_max/T − log p_max`` (``p_max ≥ 1/V``, so its log is well conditioned).
    """
    wide = torch.promote_types(x.dtype, torch.float32)
    scaled = torch.mul(x, inv_t) if x.dtype == wide else x.to(wide).mul_(inv_t)
    probs = torch.softmax(scaled, dim=-1)
    lse = scaled.amax(dim=-1, keepdim=True).sub_(probs.amax(dim=-1, keepdim=True).log_())
    return probs, lse, scaled


def _scaled_into(grad_out: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · probs`` written where the gradient is formed: ``grad_out`` itself when it has
    the working dtype, else ``probs`` (a chunk temporary), so that the rest of the gradient is
    added in float32 and rounded once (bf16 ``q`` and ``p`` rounded apart would lose a small
    difference).
    """
    target = grad_out if grad_out.dtype == probs.dtype else probs
    return torch.mul(probs, scale, out=target)


def _finish_grad(grad_out: torch.Tensor, grad: torch.Tensor) -> None:
    if grad is not grad_out:
        grad_out.copy_(grad)


def _forward_kl_chunk(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_t: float,
    grad_out: torch.Tensor | None,
    grad_scale: float,
) -> torch.Tensor:
    """Σ over rows of ``KL(p‖q)``; writes ``grad_scale · (q − p)`` into ``grad_out``.

    Per row ``KL = Σ_v p (t − s)/T + lse(s/T) − lse(t/T)`` (Σ p = 1): the logit difference is
    formed elementwise, so no two large sums cancel. ``grad_out`` may be ``s`` itself (the
    fused trainer overwrites the merged logits with their gradient): ``s`` is fully read
    before ``grad_out`` is written.
    """
    p, lse_t, t_scaled = _softmax_lse(t, inv_t)
    q, lse_s, s_scaled = _softmax_lse(s, inv_t)
    rows = torch.linalg.vecdot(p, t_scaled.sub_(s_scaled)).add_(lse_s.sub_(lse_t).squeeze(-1))
    if grad_out is not None:  # q − p in float32 (or wider), rounded once into grad_out
        torch.mul(q.sub_(p), grad_scale, out=grad_out)
    return rows.sum()


def _topk_forward_kl_chunk(
    s: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    inv_t: float,
    grad_out: torch.Tensor | None,
    grad_scale: float,
) -> torch.Tensor:
    """Σ over rows of ``Σ_k p_k (log p_k − log q_{i_k})``; writes ``grad_scale · (q − scatter(p))``.

    ``p`` is the teacher renormalised over its K entries and ``log q_i = s_i/T − lse(s/T)``.
    ``grad_out`` may alias ``s`` (see :func:`_forward_kl_chunk`).
    """
    q, lse_s, s_scaled = _softmax_lse(s, inv_t)
    log_q = s_scaled.gather(-1, indices).sub_(lse_s)
    log_p = F.log_softmax(_wide(values) * inv_t, dim=-1)
    p = log_p.exp()
    total = torch.dot(p.reshape(-1), log_p.sub_(log_q).reshape(-1))
    if grad_out is not None:
        grad = _scaled_into(grad_out, q, grad_scale)
        grad.scatter_add_(-1, indices, p.mul_(-grad_scale))
        _finish_grad(grad_out, grad)
    return total


def _chunked_kl(
    kernel: Callable[..., torch.Tensor],
    s: torch.Tensor,
    teacher: Sequence[torch.Tensor],
    temperature: float,
    chunk: int,
    grad_out: torch.Tensor | None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Run a KL chunk kernel over row chunks; the summed KL, float32 or wider."""
    total = s.new_zeros((), dtype=_wide(s[:0]).dtype)
    for span in _spans(s.shape[0], chunk):
        out = None if grad_out is None else grad_out[span]
        total += kernel(s[span], *(x[span] for x in teacher), 1.0 / temperature, out, grad_scale)
    return total


def _scaled_saved_grad(ctx: Any, grad_total: torch.Tensor) -> torch.Tensor | None:
    """``(q − p) · grad_total / T`` from the gradient the forward saved.

    Out of place: backward may run more than once on a retained graph (gradcheck does), so
    the saved tensor must stay as the forward left it.
    """
    (grad,) = ctx.saved_tensors
    if grad is None:
        return None
    return grad * (grad_total / ctx.temperature).to(grad.dtype)


class _ForwardKLSum(torch.autograd.Function):
    """Σ over rows of ``KL(p‖q)``, p = softmax(t/T), q = softmax(s/T), gradient ``(q − p)/T``.

    Hand-written and chunked over rows inside: autograd through log-softmax, exp, subtract and
    multiply kept several (positions × vocabulary) float32 tensors per source for backward and
    made about twice as many passes over them, and on CPU each fresh tensor that large is a new
    mmap whose pages the kernel must fault in and zero. Here every transient is one small
    chunk, reused by the allocator, and the forward forms the gradient ``q − p`` too and saves
    only that, in the logits' dtype; backward merely scales it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, s: torch.Tensor, t: torch.Tensor, temperature: float, chunk: int
    ) -> torch.Tensor:
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        total = _chunked_kl(_forward_kl_chunk, s, [t], temperature, chunk, grad)
        ctx.save_for_backward(grad)
        ctx.temperature = temperature
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _scaled_saved_grad(ctx, grad_total), None, None, None


class _TopKForwardKLSum(torch.autograd.Function):
    """Σ over rows of the KL from a top-K teacher to the full merged distribution.

    Gradient ``(q − scatter(p))/T``, formed in the forward and chunked like
    :class:`_ForwardKLSum`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        temperature: float,
        chunk: int,
    ) -> torch.Tensor:
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        kernel = _topk_forward_kl_chunk
        total = _chunked_kl(kernel, s, [values, indices], temperature, chunk, grad)
        ctx.save_for_backward(grad)
        ctx.temperature = temperature
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _scaled_saved_grad(ctx, grad_total), None, None, None, None


def forward_kl_with_grad(
    merged: torch.Tensor,
    teacher: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    temperature: float = 1.0,
    values: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Forward KL of (positions, vocab) rows, as :func:`kl_divergence`, and its gradient.

    Writes ``∂loss/∂merged`` into ``grad_out`` (which may be ``merged`` itself) without
    autograd: the fused trainer puts each source's logit gradient straight into the buffer its
    single backward reads, with no saved copy to scale and copy again. ``teacher`` holds full
    logits, or top-K indices when ``values`` (the top-K logits) is given. Returns the loss
    (detached).
    """
    rows = merged.shape[0]
    if rows == 0:
        return merged.new_zeros((), dtype=torch.float32)
    chunk = _rows_per_chunk(merged.shape[-1], chunk, merged.device)
    scale = temperature / rows  # ∂(T² · mean KL)/∂s = T² · (q − p)/T / rows
    if values is None:
        kernel, signal = _forward_kl_chunk, [teacher.detach()]
    else:
        kernel, signal = _topk_forward_kl_chunk, [values.detach(), teacher.long()]
    merged = merged.detach()
    total = _chunked_kl(kernel, merged, signal, temperature, chunk, grad_out, scale)
    return total / rows * temperature**2


def kl_divergence(
    merged: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean per-position KL between teacher and merged distributions, × T²."""
    s, t = select_positions(merged, mask), select_positions(teacher, mask).detach()

    if direction == "forward":
        if s.shape[0] == 0:
            return s.sum() * 0.0
        chunk = _rows_per_chunk(s.shape[-1], chunk, s.device)
        return _ForwardKLSum.apply(s, t, temperature, chunk) / s.shape[0] * temperature**2

    def rows(s_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
        return kl_to_teacher(
            s_part, t_part, temperature=temperature, direction="reverse", reduction="none"
        )

    return _chunked_mean(rows, [s, t], chunk) * temperature**2


def topk_kl_divergence(
    merged: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    chunk: int | None = None,
) -> torch.Tensor:
    """KL against a teacher known by its top-K logits (renormalised over those K), × T²."""
    s = select_positions(merged, mask)
    v = select_positions(values, mask).detach()
    idx = select_positions(indices, mask).long()

    if direction == "forward":
        if s.shape[0] == 0:
            return s.sum() * 0.0
        chunk = _rows_per_chunk(s.shape[-1], chunk, s.device)
        total = _TopKForwardKLSum.apply(s, v, idx, temperature, chunk)
        return total / s.shape[0] * temperature**2

    def rows(s_part: torch.Tensor, v_part: torch.Tensor, i_part: torch.Tensor) -> torch.Tensor:
        return kl_to_teacher(
            s_part,
            v_part,
            temperature=temperature,
            direction="reverse",
            teacher_indices=i_part,
            reduction="none",
        )

    return _chunked_mean(rows, [s, v, idx], chunk) * temperature**2


def mse_logits(
    merged: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean over counted positions and the vocabulary of the squared logit difference."""
    s, t = select_positions(merged, mask), select_positions(teacher, mask).detach()

    def rows(s_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
        return (_wide(s_part) - _wide(t_part)).pow(2).mean(-1)

    return _chunked_mean(rows, [s, t], chunk)


def topk_mse_logits(
    merged: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """Squared logit difference at the teacher's top-K entries."""
    s = select_positions(merged, mask)
    v = select_positions(values, mask).detach()
    idx = select_positions(indices, mask).long()

    def rows(s_part: torch.Tensor, v_part: torch.Tensor, i_part: torch.Tensor) -> torch.Tensor:
        return (_wide(s_part.gather(-1, i_part)) - _wide(v_part)).pow(2).mean(-1)

    return _chunked_mean(rows, [s, v, idx], chunk)


def entropy(
    merged: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean per-position entropy (nats) of the merged distribution."""
    s = select_positions(merged, mask)

    def rows(s_part: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(_wide(s_part) / temperature, dim=-1)
        return -(log_q.exp() * log_q).sum(-1)

    return _chunked_mean(rows, [s], chunk)


def cosine_similarity_loss(groups: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Mean over groups of the mean pairwise cosine similarity of participants' vectors.

    Groups with fewer than two participants, or that are not (participants, d) matrices, are
    skipped; with none left the loss is 0. Cosines follow ``F.cosine_similarity``
    (``x·y / (max(‖x‖, eps) · max(‖y‖, eps))``). Groups of one shape are stacked and done in a
    few batched ops: a model has hundreds of groups, and a Python loop over every pair of every
    group cost more than the rest of a small model's training step.
    """
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for coefficients in groups:
        if coefficients.dim() == 2 and coefficients.shape[0] >= 2:
            by_shape.setdefault(tuple(coefficients.shape), []).append(coefficients)
    if not by_shape:
        return torch.zeros((), dtype=torch.float32)
    total, count = None, 0
    for (participants, _), members in by_shape.items():
        stacked = torch.stack(members)  # (groups, participants, d)
        unit = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(eps)
        sims = unit @ unit.transpose(1, 2)  # (groups, participants, participants)
        upper = torch.triu_indices(participants, participants, 1, device=sims.device)
        per_group = sims[:, upper[0], upper[1]].mean(-1)
        part = per_group.sum()
        total = part if total is None else total + part
        count += len(members)
    assert total is not None
    return total / count


def l1_loss(groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ |c| over every coefficient of every group."""
    return sum((g.abs().sum() for g in groups), torch.zeros((), dtype=torch.float32))


def l2_loss(groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ c² over every coefficient of every group."""
    return sum((g.pow(2).sum() for g in groups), torch.zeros((), dtype=torch.float32))

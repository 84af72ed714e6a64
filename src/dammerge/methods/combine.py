"""Combining kernels of the task-vector family: sign consensus, the disjoint merge, task-vector
weighting, and the blocked weighted sum that puts them together.

Every task-vector method ends in :func:`combine_task_vectors` (mergekit's generalised task
arithmetic): ``B + λ · Σ_i w_i δ_i``, with or without a sign consensus first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32: a block's few buffers stay in the CPU's cache


@dataclass(frozen=True)
class SignConsensus:
    """How a sign is elected per entry and how the agreeing terms are averaged.

    ``weighted_election``: the elected sign is that of ``Σ_i w_i δ_i`` (TIES) or of the plain
    ``Σ_i δ_i`` (SCE's erase step). ``min_divisor``: the disjoint mean divides by the sum of
    the agreeing models' weights; ``None`` turns a zero sum into 1 (TIES), a number raises
    every sum to at least that number (SCE: 1e-6).
    """

    weighted_election: bool = True
    min_divisor: float | None = None


TIES_CONSENSUS = SignConsensus()
SCE_CONSENSUS = SignConsensus(weighted_election=False, min_divisor=1e-6)


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: SignConsensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Weighted sum of task vectors added to the base (generalised task arithmetic).

    Args:
        base: the base tensor ``B``.
        deltas: the task vectors ``δ_i`` (already sparsified), one dtype.
        weights: ``w_i``, rounded to the deltas' dtype before use.
        consensus: ``None`` sums every term; a :class:`SignConsensus` keeps only the terms
            that agree with the elected sign (:func:`elect_sign`, :func:`disjoint_sum`).
        normalize: divide by ``Σ_i w_i`` (without consensus; a sum below 1e-8 by 1), or by
            the agreeing models' weights (with consensus, the disjoint mean).
        lambda_: ``λ``, scales the combined task vector.

    Returns:
        ``B + λ · combined``, in the promoted dtype of ``B`` and the deltas.

    Every output entry depends only on the same entry of the inputs, so the work runs block
    by block: the dozen passes of a TIES combine then read and write cache-resident buffers
    instead of tensor-sized ones in main memory, and only the output is tensor-sized. Model by
    model, never a stack of N copies: the same arithmetic as stacking (each ``w_i * δ_i``
    rounded, then summed in model order).
    """
    dtype = deltas[0].dtype
    device = deltas[0].device
    w = [float(v) for v in torch.tensor(list(weights), dtype=dtype)]  # rounded like the data
    flat_base = base.reshape(-1)
    flat_deltas = [d.reshape(-1) for d in deltas]
    out = torch.empty(flat_base.shape, dtype=torch.promote_types(dtype, base.dtype), device=device)
    block = BLOCK_ELEMENTS if device.type == "cpu" else max(1, out.numel())
    # four block-sized work rows (sum, term, elected sign, divisor), reused by every block
    work = torch.empty((4, min(block, out.numel())), dtype=dtype, device=device)
    for start in range(0, out.numel(), block):
        span = slice(start, start + block)
        blocks = [d[span] for d in flat_deltas]
        mixed = _combine_block(blocks, w, work[:, : blocks[0].numel()], consensus, normalize)
        if lambda_ != 1.0:
            mixed.mul_(lambda_)
        torch.add(mixed, flat_base[span], out=out[span])
    return out.view(base.shape)


def _combine_block(
    deltas: Sequence[torch.Tensor],
    w: Sequence[float],
    work: torch.Tensor,
    consensus: SignConsensus | None,
    normalize: bool,
) -> torch.Tensor:
    """One block of :func:`combine_task_vectors`, before ``lambda`` and the base."""
    mixed, term = work[0], work[1]
    plain_election = consensus is not None and not consensus.weighted_election
    weighted_sum(deltas, [1.0] * len(w) if plain_election else w, mixed, term)
    if consensus is not None:
        elected = elect_sign(mixed, out=work[2])
        return disjoint_sum(
            deltas,
            w,
            elected,
            out=mixed,
            work=work[1::2],
            normalize=normalize,
            min_divisor=consensus.min_divisor,
        )
    if normalize:
        total = sum(w)
        mixed.div_(1.0 if abs(total) < 1e-8 else total)
    return mixed


def weighted_sum(
    deltas: Sequence[torch.Tensor], w: Sequence[float], out: torch.Tensor, term: torch.Tensor
) -> torch.Tensor:
    """``Σ_i w_i δ_i`` in model order, from ``+0.0``, written to ``out`` (``term``: scratch)."""
    out.zero_()
    for delta, weight in zip(deltas, w, strict=True):
        out.add_(torch.mul(delta, weight, out=term))
    return out


def elect_sign(mixed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """TIES' sign election.

    Args:
        mixed: the per-entry sum the election is made from (``Σ_i w_i δ_i`` or ``Σ_i δ_i``).
        out: where to write the result (may not alias ``mixed``).

    Returns:
        ``e = +1`` where ``mixed >= 0`` and ``-1`` elsewhere: ``copysign``, and a sum that
        starts from +0.0 is never -0.0, so an exact tie elects ``+``.
    """
    return torch.copysign(out.fill_(1.0), mixed, out=out)


def disjoint_sum(
    deltas: Sequence[torch.Tensor],
    w: Sequence[float],
    elected: torch.Tensor,
    *,
    out: torch.Tensor,
    work: torch.Tensor,
    normalize: bool,
    min_divisor: float | None = None,
) -> torch.Tensor:
    """TIES' disjoint merge: the sum (or mean) of the terms that agree with the elected sign.

    Args:
        deltas: the task vectors ``δ_i``.
        w: their weights ``w_i``.
        elected: the elected sign ``e`` per entry (:func:`elect_sign`).
        out: where to write the result (may alias neither ``elected`` nor ``work``).
        work: two rows of scratch (the term, the divisor).
        normalize: divide by ``D = Σ_{i agrees} w_i`` (the disjoint mean).
        min_divisor: ``None`` divides by 1 where ``D = 0``; a number divides by
            ``max(D, min_divisor)``.

    Returns:
        ``Σ_{i: t_i e > 0} t_i`` with ``t_i = w_i δ_i`` (over ``D`` when ``normalize``); zero
        terms never count as agreeing.

    The agreeing sum is computed as ``e · Σ_i relu(t_i · e)``: bit for bit the sum of the
    agreeing terms (negation is exact), with float passes only. Boolean masks and mixed-dtype
    arithmetic ran several times slower per element on the CPU.
    """
    term, divisor = work
    total = out.zero_()
    divisor.zero_()
    for delta, weight in zip(deltas, w, strict=True):
        agreeing = torch.mul(delta, weight, out=term).mul_(elected).clamp_(min=0)
        total.add_(agreeing)
        if normalize:  # sign(relu(.)) is 1 exactly where the term agrees: += weight there
            divisor.add_(agreeing.sign_(), alpha=weight)
    total.mul_(elected)
    if normalize:
        if min_divisor is None:
            divisor.masked_fill_(divisor == 0, 1.0)
        else:
            divisor.clamp_(min=min_divisor)
        total.div_(divisor)
    return total


def energy_weights(deltas: Sequence[torch.Tensor]) -> list[float]:
    """SCE's calculate step: weight each task vector by its share of the squared magnitude.

    Args:
        deltas: the task vectors ``δ_1 .. δ_N`` (after selection).

    Returns:
        ``w_i = s_i / Σ_k s_k`` with ``s_i = mean_j δ_i[j]²`` (in the deltas' dtype, as
        mergekit computes it), or ``1/N`` each when ``|Σ_k s_k| < 1e-6``.
    """
    energy = torch.stack([d.square().mean() for d in deltas])
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return [float(v) for v in torch.ones_like(energy) / len(deltas)]
    return [float(v) for v in energy / total]

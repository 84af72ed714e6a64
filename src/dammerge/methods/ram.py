"""The RAM kernels (Reinforced Agent Merging): task-vector entries changed by one model are
kept whole, entries changed by several are averaged over those models; RAM+ also amplifies
each model's unique entries by how much of it is shared."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def active_entries(
    deltas: Sequence[torch.Tensor], epsilon: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Which entries each task vector changes, and by how many models each entry is changed.

    Args:
        deltas: the task vectors ``δ_i = W_i − B``.
        epsilon: the magnitude an entry must exceed to count as changed.

    Returns:
        ``(a, c)``: the boolean masks ``a_i = |δ_i| > epsilon`` and the per-entry count
        ``c = Σ_i a_i`` (int32).
    """
    masks = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(deltas[0].shape, dtype=torch.int32, device=deltas[0].device)
    for mask in masks:
        count += mask
    return masks, count


def unique_share_boosts(
    masks: Sequence[torch.Tensor], count: torch.Tensor, r: float, alpha: float, epsilon: float
) -> list[float]:
    """RAM+'s per-model rescaling of unique entries (tensor-local, as mergekit's ``ramplus_tl``).

    Args:
        masks: ``a_i``, the entries each model changes (:func:`active_entries`).
        count: ``c``, how many models change each entry.
        r: the rescaling strength.
        alpha: the bound on the overlap ratio.
        epsilon: the least divisor of the ratio (no division by zero).

    Returns:
        ``λ_i = 1 + r · clamp(ρ_i, 0, alpha)`` with ``ρ_i = s_i / max(u_i, epsilon)``, ``s_i``
        the number of entries model ``i`` changes along with another model and ``u_i`` the
        number it alone changes.
    """
    shared, unique = count > 1, count == 1
    boosts = []
    for mask in masks:
        ratio = int((mask & shared).sum()) / max(int((mask & unique).sum()), epsilon)
        boosts.append(1.0 + r * min(max(ratio, 0.0), alpha))
    return boosts


def reinforced_agent_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    r: float = 0.0,
    alpha: float = 0.2,
) -> torch.Tensor:
    """RAM, and with ``r > 0`` RAM+ (tensor-local): the disjoint mean of the changed entries.

    Args:
        base: the base tensor ``B``.
        tensors: the fine-tuned tensors ``W_1 .. W_N``.
        epsilon: an entry of ``δ_i = W_i − B`` counts as changed when ``|δ_i| > epsilon``.
        r: RAM+'s rescaling strength (0: plain RAM).
        alpha: RAM+'s bound on the overlap ratio (:func:`unique_share_boosts`).

    Returns:
        ``B + Σ_i a_i δ_i / c`` where ``c ≥ 2`` models change the entry (their mean),
        ``B + λ_i δ_i`` where model ``i`` alone changes it (``λ_i = 1`` for RAM), ``B`` where
        none does; ``a_i``, ``c`` from :func:`active_entries`.
    """
    deltas = [w - base for w in tensors]
    masks, count = active_entries(deltas, epsilon)
    mean = torch.zeros_like(base)
    for delta, mask in zip(deltas, masks, strict=True):
        mean += delta * mask
    mean /= count.clamp(min=1)  # where one model changes an entry: that model's change
    if r == 0.0:
        return base + mean
    boosts = unique_share_boosts(masks, count, r, alpha, epsilon)
    boosted = torch.zeros_like(base)
    for delta, mask, boost in zip(deltas, masks, boosts, strict=True):
        boosted.add_(delta * mask, alpha=boost)
    return base + torch.where(count == 1, boosted, mean)

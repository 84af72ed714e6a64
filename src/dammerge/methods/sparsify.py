"""Sparsifier and rescale kernels of the task-vector family.

TIES, DARE, breadcrumbs, DELLA and SCE differ mostly in how they thin the task vectors
``δ_i = W_i − B`` before combining them; these functions are those thinning steps, each pure
over tensors. :mod:`dammerge.methods.catalogue` binds them to recipe parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

RescaleMode = Literal["l1", "density", "none"]
DellaRescaleMode = Literal["l1", "probability"]

SELECT_DIRECTLY_BELOW = 1 << 20
VARIANCE_BLOCK = 1 << 16  # entries per block of the across-model variance (N rows each)


def rescale_kept(
    original: torch.Tensor, kept: torch.Tensor, density: float, mode: RescaleMode
) -> torch.Tensor:
    """Rescale a sparsified tensor after dropping entries.

    Args:
        original: the tensor before dropping, ``δ``.
        kept: ``δ`` with the dropped entries zeroed, ``δ'``.
        density: the keep probability ``p`` used to drop.
        mode: ``"density"`` returns ``δ' / p`` (the DARE paper; unbiased in expectation);
            ``"l1"`` returns ``δ' · ‖δ‖₁ / ‖δ'‖₁``, restoring the L1 norm exactly (mergekit), and
            ``δ'`` unchanged when either norm is below 1e-7; ``"none"`` returns ``δ'``.

    Returns:
        The rescaled ``δ'``.
    """
    if mode == "none":
        return kept
    if mode == "density":
        return kept / density
    before, after = original.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of a flat tensor, equal values going to the lower index first.

    Args:
        magnitudes: a flat tensor.
        k: how many entries to keep (clamped to ``0..n``).

    Returns:
        A boolean mask: exactly the first ``k`` positions of a stable descending sort.

    A sort is O(n log n) and was most of a TIES merge's time; :func:`kth_largest` finds the
    k-th largest value in O(n), everything above it is kept, and only the entries equal to it
    are looked at one by one (bf16 checkpoints give many such exact ties).
    """
    n = magnitudes.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    if torch.isnan(magnitudes).any():  # NaN sorts first: keep the sort's exact semantics
        keep = torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
        keep[torch.argsort(magnitudes, descending=True, stable=True)[:k]] = True
        return keep
    threshold = kth_largest(magnitudes, k)
    keep = magnitudes > threshold
    missing = k - int(torch.count_nonzero(keep))  # count_nonzero: no int64 copy, unlike sum
    if missing > 0:
        tied = torch.nonzero(magnitudes == threshold).squeeze(1)[:missing]
        keep[tied] = True
    return keep


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry (``1 <= k <= n``) of a flat tensor without NaN.

    ``kthvalue`` on a large tensor copies it and allocates an int64 index per entry (3x the
    tensor's memory) and runs on one core. Instead, a strided sample brackets the answer
    between two values, two vectorised counting passes check that the bracket holds it, and
    the selection runs only on the few entries inside. If the bracket misses (adversarial
    data), the whole tensor is selected from: the answer is exact either way.
    """
    n = values.numel()
    if n <= SELECT_DIRECTLY_BELOW:
        return kth_smallest(values, n - k + 1)
    sample = values[:: max(1, n // (1 << 18))].contiguous()
    s = sample.numel()
    centre, margin = k / n * s, 4.0 * s**0.5 + 2  # k-th largest's rank in the sample, +- slack
    high_rank, low_rank = max(1, int(centre - margin)), min(s, int(centre + margin) + 1)
    high = kth_smallest(sample, s - high_rank + 1)
    low = kth_smallest(sample, s - low_rank + 1)
    above = int(torch.count_nonzero(values > high))
    band = (values >= low) & (values <= high)
    inside = int(torch.count_nonzero(band))
    if above < k <= above + inside:
        candidates = values[band]
        del band
        return kth_smallest(candidates, candidates.numel() - (k - above) + 1)
    return kth_smallest(values, n - k + 1)


def kth_smallest(values: torch.Tensor, rank: int, by_sort: bool | None = None) -> torch.Tensor:
    """The ``rank``-th smallest entry (from 1) of a flat tensor, as a 0-d tensor.

    On the CPU ``kthvalue`` (a selection, O(n)) is the fastest. On a GPU it selects each slice
    in one thread block, so a single long slice runs on one of the device's multiprocessors: a
    sort (a radix sort over all of them) is several times faster there.
    Both give the same value, NaN counting as the largest. ``by_sort`` forces the choice
    (default: sort on a GPU).
    """
    if by_sort is None:
        by_sort = values.device.type == "cuda"
    if by_sort:
        return torch.sort(values).values[rank - 1]
    return torch.kthvalue(values, rank).values


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the largest-magnitude entries.

    Args:
        delta: a task vector ``δ``.
        density: the fraction ``d`` to keep; ``⌊d·n⌋`` entries of largest ``|δ|`` survive
            (ties to the lower index), ``d >= 1`` keeps everything.

    Returns:
        ``δ`` with the other entries zeroed.
    """
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    return (flat * top_k_mask(flat.abs(), k)).view_as(delta)


def magnitude_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: keep a band of magnitudes, dropping outliers and small entries.

    Args:
        delta: a task vector ``δ`` of ``n`` entries.
        density: ``d``; the band holds ``⌊d·n⌋`` entries, ``d >= 1`` keeps everything.
        gamma: ``γ``; the ``⌊γ·n⌋`` largest magnitudes are dropped as outliers (fewer when the
            band needs them: at most ``n − ⌊d·n⌋``).

    Returns:
        ``δ`` with only ranks ``⌊γ·n⌋ .. ⌊γ·n⌋ + ⌊d·n⌋`` of the descending ``|δ|`` order kept.
    """
    if density >= 1.0:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    flat = delta.reshape(-1)
    magnitudes = flat.abs()
    # positions n_top .. n_top + n_keep of the stable descending order: the top
    # (n_top + n_keep) minus the top n_top (prefixes of one stable order are nested)
    mask = top_k_mask(magnitudes, n_top + n_keep) & ~top_k_mask(magnitudes, n_top)
    return (flat * mask).view_as(delta)


def bernoulli_mask(
    like: torch.Tensor, keep_probability: torch.Tensor | float, generator: torch.Generator | None
) -> torch.Tensor:
    """A seeded 0/1 mask shaped like ``like``, with ``P(1) = keep_probability`` (a scalar or
    one probability per entry), in ``like``'s dtype."""
    probs = torch.as_tensor(keep_probability, dtype=torch.float32, device=like.device)
    probs = probs.expand(like.shape).contiguous()
    return torch.bernoulli(probs, generator=generator).to(like.dtype)


def random_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    rescale: RescaleMode = "l1",
) -> torch.Tensor:
    """DARE: drop entries at random and rescale the rest.

    Args:
        delta: a task vector ``δ``.
        density: the keep probability ``p`` of every entry; ``p >= 1`` returns ``δ`` and
            ``p <= 0`` zeros, without drawing.
        generator: the seeded source of the one Bernoulli draw per entry.
        rescale: how the kept entries are rescaled (:func:`rescale_kept`).

    Returns:
        ``rescale(δ ⊙ m)`` with ``m_j ~ Bernoulli(p)``.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    kept = delta * bernoulli_mask(delta, density, generator)
    return rescale_kept(delta, kept, density, rescale)


def magnitude_ranked_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    rescale: bool = True,
    rescale_mode: DellaRescaleMode = "l1",
) -> torch.Tensor:
    """DELLA's MagPrune: drop at random, keeping large entries more often.

    Args:
        delta: a task vector ``δ``; each row (a 1-D tensor is one row) is ranked on its own.
        density: ``d``; ``d >= 1`` returns ``δ`` and ``d <= 0`` zeros, without drawing.
        epsilon: ``ε``; an entry of magnitude rank ``r`` among ``w`` in its row is kept with
            ``p = d − ε + 2ε · r / (w − 1)`` (smallest ``d − ε``, largest ``d + ε``), which
            must stay in ``(0, 1]``.
        generator: the seeded source of the one Bernoulli draw per entry.
        rescale: whether the kept entries are rescaled.
        rescale_mode: ``"probability"`` divides each kept entry by its own ``p`` (the DELLA
            paper; unbiased in expectation), ``"l1"`` restores the L1 norm of the whole task
            vector (mergekit's behaviour, the default).

    Returns:
        The thinned (and rescaled) ``δ``.

    Raises:
        ValueError: probabilities outside ``(0, 1]`` or an unknown ``rescale_mode``.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    if not (density - epsilon > 0.0 and density + epsilon <= 1.0):
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon <= 1 "
            f"(got density={density}, epsilon={epsilon})"
        )
    if rescale_mode not in ("l1", "probability"):
        raise ValueError(f"rescale_mode must be 'l1' or 'probability', got {rescale_mode!r}")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    # probabilities in at least float32 (bf16 cannot tell 0.35 from 0.351), in float64 for a
    # float64 merge so the 1/p rescale is exact there
    prob_dtype = torch.promote_types(rows.dtype, torch.float32)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(prob_dtype)
    fraction = ranks / max(width - 1, 1)
    probs = (density - epsilon) + fraction * (2 * epsilon)
    kept = rows * bernoulli_mask(rows, probs, generator)
    if rescale and rescale_mode == "probability":
        kept = (kept / probs).to(rows.dtype)
    elif rescale:
        kept = rescale_kept(rows, kept, density, "l1")
    return kept.view_as(delta)


def top_variance_mask(deltas: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """SCE's select: the entries on which the task vectors disagree most.

    Args:
        deltas: the task vectors ``δ_1 .. δ_N`` of one tensor, all of one shape and dtype.
        fraction: ``τ``; of the ``m`` entries whose population variance across the models
            ``σ²_j = (1/N) Σ_i (δ_i[j] − mean_i δ_i[j])²`` is nonzero, the ``k = ⌊m·τ⌋`` of
            largest ``σ²`` are kept (ties to the lower index). ``τ >= 1`` keeps every entry.

    Returns:
        A boolean mask shaped like one task vector.

    ``k`` is computed in float32, as mergekit computes it (``count_nonzero(σ²) · τ``): for
    some ``m`` that float32 product falls just below an integer the exact product reaches.
    The variance is taken block by block, over ``N`` block-sized rows instead of a stack of
    ``N`` whole tensors; each entry's variance is the one a full stack gives, bit for bit.
    """
    shape, device = deltas[0].shape, deltas[0].device
    if fraction >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if fraction <= 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    flat = [d.reshape(-1) for d in deltas]
    variance = torch.empty_like(flat[0])
    block = VARIANCE_BLOCK if device.type == "cpu" else max(1, variance.numel())
    for start in range(0, variance.numel(), block):
        span = slice(start, start + block)
        rows = torch.stack([d[span] for d in flat])
        torch.var(rows, dim=0, unbiased=False, out=variance[span])
    k = int(torch.count_nonzero(variance).to(torch.float32) * fraction)
    return top_k_mask(variance, k).view(shape)

"""Shared kernels of the task-vector family: sparsification and sign consensus.

TIES, DARE, breadcrumbs and DELLA differ only in how each task vector is sparsified and whether
signs are elected before summing; these functions are the pieces they are built from.
"""

from __future__ import annotations

from typing import Literal

import torch

RescaleMode = Literal["l1", "density", "none"]
DellaRescaleMode = Literal["l1", "probability"]


def rescale_kept(
    original: torch.Tensor, kept: torch.Tensor, density: float, mode: RescaleMode
) -> torch.Tensor:
    """Rescale a sparsified tensor after dropping entries.

    ``density`` divides by the keep probability (the DARE paper; unbiased in expectation);
    ``l1`` restores the L1 norm of the original exactly (mergekit's current behaviour);
    ``none`` leaves the kept entries as they were.
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
    """Boolean mask of the ``k`` largest entries of a flat tensor, equal values going to the
    lower index first: exactly the first ``k`` of a stable descending sort.

    A sort is O(n log n) and was most of a TIES merge's time; ``kthvalue`` finds the k-th
    largest value in O(n), everything above it is kept, and only the entries equal to it are
    looked at one by one (bf16 checkpoints give many such exact ties).
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


SELECT_DIRECTLY_BELOW = 1 << 20


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry (1 <= k <= n) of a flat tensor without NaN.

    ``kthvalue`` on a large tensor copies it and allocates an int64 index per entry (3x the
    tensor's memory) and runs on one core. Instead, a strided sample brackets the answer
    between two values, two vectorised counting passes check that the bracket holds it, and
    ``kthvalue`` runs only on the few entries inside. If the bracket misses (adversarial
    data), the direct ``kthvalue`` is used: the answer is exact either way.
    """
    n = values.numel()
    if n <= SELECT_DIRECTLY_BELOW:
        return torch.kthvalue(values, n - k + 1).values
    sample = values[:: max(1, n // (1 << 18))].contiguous()
    s = sample.numel()
    centre, margin = k / n * s, 4.0 * s**0.5 + 2  # k-th largest's rank in the sample, +- slack
    high_rank, low_rank = max(1, int(centre - margin)), min(s, int(centre + margin) + 1)
    high = torch.kthvalue(sample, s - high_rank + 1).values
    low = torch.kthvalue(sample, s - low_rank + 1).values
    above = int(torch.count_nonzero(values > high))
    band = (values >= low) & (values <= high)
    inside = int(torch.count_nonzero(band))
    if above < k <= above + inside:
        candidates = values[band]
        del band
        return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values
    return torch.kthvalue(values, n - k + 1).values


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES' trim step)."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    return (flat * top_k_mask(flat.abs(), k)).view_as(delta)


def magnitude_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude outliers, then keep
    the next ``density`` fraction by magnitude and drop the small rest."""
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
    """A 0/1 mask with ``P(1) = keep_probability`` (scalar or per-entry), seeded."""
    probs = torch.as_tensor(keep_probability, dtype=torch.float32, device=like.device)
    probs = probs.expand(like.shape).contiguous()
    return torch.bernoulli(probs, generator=generator).to(like.dtype)


def random_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    rescale: RescaleMode = "l1",
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density`` and rescale what is kept."""
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
    """DELLA's MagPrune: per row, keep probabilities rise linearly with magnitude rank from
    ``density - epsilon`` (smallest) to ``density + epsilon`` (largest).

    When ``rescale``: ``rescale_mode="probability"`` divides each kept entry by its own keep
    probability (the DELLA paper; unbiased in expectation), ``"l1"`` restores the L1 norm of the
    whole task vector (mergekit's behaviour, the default).
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

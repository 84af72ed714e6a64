"""Independent reference implementations of the data-free methods, in plain numpy and loops.

Written from the method definitions (the papers and mergekit's documented semantics), not from
dammerge's code: no dammerge import here. Every function works on float64 numpy arrays and
favours the obvious loop over speed, so that a disagreement points at the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def as_np(tensor) -> np.ndarray:
    """A torch tensor (or array) as a float64 numpy array."""
    if hasattr(tensor, "detach"):
        return tensor.detach().cpu().double().numpy()
    return np.asarray(tensor, dtype=np.float64)


def linear(xs: Sequence[np.ndarray], weights: Sequence[float], normalize: bool) -> np.ndarray:
    total = np.zeros_like(xs[0])
    for x, w in zip(xs, weights, strict=True):
        total = total + w * x
    return total / sum(weights) if normalize else total


def top_k_mask(delta: np.ndarray, k: int) -> np.ndarray:
    """1 for the k entries of largest magnitude (ties broken by position), else 0."""
    flat = delta.ravel()
    order = sorted(range(flat.size), key=lambda i: (-abs(flat[i]), i))
    mask = np.zeros(flat.size)
    for i in order[:k]:
        mask[i] = 1.0
    return mask.reshape(delta.shape)


def trim(delta: np.ndarray, density: float) -> np.ndarray:
    """TIES' trim: keep the int(density * n) largest-magnitude entries."""
    if density >= 1:
        return delta.copy()
    return delta * top_k_mask(delta, int(density * delta.size))


def band(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: drop the top int(gamma*n) outliers (fewer if density needs them), keep
    the next int(density*n) by magnitude, drop the rest."""
    if density >= 1:
        return delta.copy()
    n = delta.size
    n_keep = int(density * n)
    n_top = int(gamma * n)
    if n_top + n_keep > n:
        n_top = n - n_keep
    flat = delta.ravel()
    order = sorted(range(n), key=lambda i: (-abs(flat[i]), i))
    out = np.zeros(n)
    for i in order[n_top : n_top + n_keep]:
        out[i] = flat[i]
    return out.reshape(delta.shape)


def l1_rescaled(original: np.ndarray, kept: np.ndarray) -> np.ndarray:
    before, after = np.abs(original).sum(), np.abs(kept).sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def combine(
    base: np.ndarray,
    deltas: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> np.ndarray:
    """Generalised task arithmetic, entry by entry.

    Without consensus: base + λ Σ wᵢδᵢ (÷ Σ wᵢ if normalize). With consensus (TIES): the elected
    sign of an entry is the sign of Σ wᵢδᵢ, + on an exact tie; only models whose weighted delta
    has that sign (zeros never) contribute; normalize divides by the sum of their weights.
    """
    out = base.astype(np.float64).ravel().copy()
    flat = [d.ravel() for d in deltas]
    for j in range(out.size):
        values = [w * d[j] for w, d in zip(weights, flat, strict=True)]
        if consensus:
            elected = 1.0 if sum(values) >= 0 else -1.0
            chosen = [(w, v) for w, v in zip(weights, values, strict=True) if np.sign(v) == elected]
            mixed = sum(v for _, v in chosen)
            divisor = sum(w for w, _ in chosen)
            if divisor == 0:
                divisor = 1.0
        else:
            mixed = sum(values)
            divisor = sum(weights)
            if abs(divisor) < 1e-8:
                divisor = 1.0
        if normalize:
            mixed = mixed / divisor
        out[j] += lambda_ * mixed
    return out.reshape(base.shape)


def della_probabilities(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Keep probability of each entry: per row (a 1-D tensor is one row), rising linearly with
    the magnitude rank from density − ε (smallest) to density + ε (largest)."""
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    probs = np.zeros(rows.shape)
    width = rows.shape[1]
    for r in range(rows.shape[0]):
        order = sorted(range(width), key=lambda i, r=r: (abs(rows[r, i]), i))
        for rank, i in enumerate(order):
            fraction = rank / (width - 1) if width > 1 else 0.0
            probs[r, i] = density - epsilon + 2 * epsilon * fraction
    return probs.reshape(delta.shape)


def slerp(t: float, v0: np.ndarray, v1: np.ndarray, threshold: float = 0.9995) -> np.ndarray:
    """Spherical interpolation of flattened tensors; linear when (anti-)parallel or zero."""
    a, b = v0.ravel(), v1.ravel()
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    if na < 1e-8 or nb < 1e-8:
        return (1 - t) * v0 + t * v1
    cos = float(a @ b) / (na * nb)
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def model_stock(base: np.ndarray, xs: Sequence[np.ndarray], filter_wise: bool) -> np.ndarray:
    """Model Stock: per tensor (or per vector along the last axis), the mean pairwise cosine
    of the task vectors sets t = N cos / (1 + (N − 1) cos), 0 where 1 + (N − 1) cos is below
    1e-6 in size; result t·mean(xᵢ) + (1 − t)·base."""
    if filter_wise and base.ndim >= 2:
        rows = [(base[r], [x[r] for x in xs]) for r in range(base.shape[0])]
        return np.stack([model_stock(b, rs, filter_wise=base.ndim > 2) for b, rs in rows])
    n = len(xs)
    offsets = [(x - base).ravel() for x in xs]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norm = max(np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]), 1e-6)
            cosines.append(min(1.0, max(-1.0, float(offsets[i] @ offsets[j]) / norm)))
    cos = sum(cosines) / len(cosines)
    t = 0.0 if abs(1 + (n - 1) * cos) < 1e-6 else n * cos / (1 + (n - 1) * cos)
    mean = sum(xs) / n
    return t * mean + (1 - t) * base


def gradient(values: Sequence[float], t: float) -> float:
    """A list of numbers spread evenly over [0, 1], read at t by linear interpolation."""
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    i0 = min(math.floor(scaled), len(values) - 1)
    i1 = min(i0 + 1, len(values) - 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def sce(base: np.ndarray, xs: Sequence[np.ndarray], select_topk: float) -> np.ndarray:
    """SCE (FuseChat 2.0, as mergekit 0.1.5 runs it), entry by entry.

    Select: unless τ = select_topk >= 1, keep in every task vector only the k entries of largest
    population variance across the models (ties to the lower index), k = ⌊m·τ⌋ in float32 with m
    the number of entries of nonzero variance (τ <= 0 keeps none). Calculate: wᵢ = sᵢ / Σ s,
    sᵢ = mean δᵢ² (1/N each if Σ s < 1e-6). Erase: per entry the elected sign is that of the plain
    Σ δᵢ (+ on a tie); only nonzero δᵢ of that sign count. Result: base + Σ wᵢδᵢ / max(Σ wᵢ, 1e-6)
    over the counted models.
    """
    deltas = [(x - base).astype(np.float64).ravel() for x in xs]
    n, size = len(deltas), deltas[0].size
    if select_topk < 1:
        variance = []
        for j in range(size):
            values = [d[j] for d in deltas]
            mean = sum(values) / n
            variance.append(sum((v - mean) ** 2 for v in values) / n)
        nonzero = sum(1 for v in variance if v != 0)
        k = int(np.float32(nonzero) * np.float32(select_topk)) if select_topk > 0 else 0
        keep = set(sorted(range(size), key=lambda j: (-variance[j], j))[:k])
        deltas = [np.array([d[j] if j in keep else 0.0 for j in range(size)]) for d in deltas]
    energy = [float(np.mean(d**2)) for d in deltas]
    total = sum(energy)
    weights = [1.0 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = base.astype(np.float64).ravel().copy()
    for j in range(size):
        elected = 1.0 if sum(d[j] for d in deltas) >= 0 else -1.0
        counted = [
            (w, d[j]) for w, d in zip(weights, deltas, strict=True) if np.sign(d[j]) == elected
        ]
        numerator = sum(w * v for w, v in counted)
        out[j] += numerator / max(sum(w for w, _ in counted), 1e-6)
    return out.reshape(base.shape)


def _slerp_pair(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SLERP of two vectors by the textbook formula; the straight line when exactly
    (anti-)parallel (NuSLERP has no threshold)."""
    na, nb = max(float(np.linalg.norm(a)), 1e-7), max(float(np.linalg.norm(b)), 1e-7)
    cos = max(-1.0, min(1.0, float(a @ b) / (na * nb)))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def nuslerp(t: float, v0: np.ndarray, v1: np.ndarray, flatten: bool, row_wise: bool) -> np.ndarray:
    """NuSLERP: one SLERP of the flattened tensors, or one per vector along the last axis
    (``row_wise``: along the first axis), each vector taken out with explicit indexing."""
    if flatten:
        return _slerp_pair(t, v0.ravel(), v1.ravel()).reshape(v0.shape)
    axis = 0 if row_wise else v0.ndim - 1
    out = np.empty_like(v0, dtype=np.float64)
    others = [range(size) for k, size in enumerate(v0.shape) if k != axis]
    for index in np.ndindex(*[len(r) for r in others]):
        where = list(index)
        where.insert(axis, slice(None))
        out[tuple(where)] = _slerp_pair(t, v0[tuple(where)], v1[tuple(where)])
    return out


def karcher_by_descent(
    xs: Sequence[np.ndarray], weights: Sequence[float], steps: int = 4000, rate: float = 0.3
) -> np.ndarray:
    """The weighted Karcher mean of the directions at the weighted mean norm, by brute force:
    many short Riemannian gradient steps on Σ wᵢ arccos(μ·uᵢ)², starting from the first
    direction (not from the chordal mean, as the library does)."""
    total = sum(weights)
    w = [v / total for v in weights]
    norms = [float(np.linalg.norm(x)) for x in xs]
    units = [x.ravel() / n for x, n in zip(xs, norms, strict=True)]
    mu = units[0].copy()
    for _ in range(steps):
        gradient = np.zeros_like(mu)
        for wi, u in zip(w, units, strict=True):
            cos = max(-1.0, min(1.0, float(mu @ u)))
            theta = math.acos(cos)
            if theta > 1e-15:
                gradient += wi * theta / math.sin(theta) * (u - cos * mu)
        step = rate * gradient
        length = float(np.linalg.norm(step))
        if length < 1e-16:
            break
        mu = math.cos(length) * mu + math.sin(length) * step / length
        mu /= np.linalg.norm(mu)
    return sum(wi * n for wi, n in zip(w, norms, strict=True)) * mu.reshape(xs[0].shape)


def nearswap(t: float, base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """NearSwap entry by entry: weight min(1, max(0, t / max(|a − b|, 1e-6)))."""
    out = np.empty(base.size)
    for j, (a, b) in enumerate(zip(base.ravel(), other.ravel(), strict=True)):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        out[j] = w * b + (1 - w) * a
    return out.reshape(base.shape)


def arcee_fusion(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Arcee Fusion: importance |W − B| · KL(softmax(W row) + 1e-8 ‖ softmax(B row) + 1e-8) per
    entry, the fence median + 1.5 (Q3 − Q1) with Q at sorted index ⌊q (n − 1)⌋; at or above it
    the base plus the whole change, B + (W − B) (W up to B's rounding), B elsewhere."""
    b2 = base.reshape(-1, base.shape[-1])
    w2 = other.reshape(b2.shape)
    importance = np.empty(b2.shape)
    for i in range(b2.shape[0]):
        p = np.exp(w2[i] - w2[i].max())
        p = p / p.sum() + 1e-8
        q = np.exp(b2[i] - b2[i].max())
        q = q / q.sum() + 1e-8
        kl = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
        for j in range(b2.shape[1]):
            importance[i, j] = abs(w2[i, j] - b2[i, j]) * kl
    ranked = sorted(importance.ravel())
    n = len(ranked)
    q1, median, q3 = (ranked[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    fence = median + 1.5 * (q3 - q1)
    return np.where(importance >= fence, b2 + (w2 - b2), b2).reshape(base.shape)


def ram(
    base: np.ndarray,
    xs: Sequence[np.ndarray],
    epsilon: float,
    r: float = 0.0,
    alpha: float = 0.0,
) -> np.ndarray:
    """RAM (r = 0) and tensor-local RAM+, entry by entry: the models whose |δ| exceeds epsilon
    at an entry are its contributors; one contributor adds λᵢδᵢ (λᵢ = 1 + r·min(max(ρᵢ, 0),
    alpha), ρᵢ = #shared / max(#unique, epsilon) over model i's entries), several add their
    mean, none leave the base."""
    deltas = [(x - base).ravel() for x in xs]
    size = deltas[0].size
    contributors = [[i for i, d in enumerate(deltas) if abs(d[j]) > epsilon] for j in range(size)]
    boosts = []
    for i in range(len(deltas)):
        shared = sum(1 for c in contributors if i in c and len(c) > 1)
        unique = sum(1 for c in contributors if c == [i])
        rho = shared / max(unique, epsilon) if r else 0.0
        boosts.append(1.0 + r * min(max(rho, 0.0), alpha))
    out = base.ravel().astype(np.float64).copy()
    for j, c in enumerate(contributors):
        if len(c) == 1:
            out[j] += boosts[c[0]] * deltas[c[0]][j]
        elif c:
            out[j] += sum(deltas[i][j] for i in c) / len(c)
    return out.reshape(base.shape)

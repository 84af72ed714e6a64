"""Calling a registered method the way the executor does, from plain numpy inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dammerge.methods import METHODS, REQUIRED, MergeInputs


def tensor(array: np.ndarray | Sequence[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64), dtype=dtype)


def run(
    method: str,
    tensors: Sequence[np.ndarray],
    *,
    base: np.ndarray | None = None,
    model_params: Sequence[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """Run registry method ``method`` with the method's defaults filled in (as the plan does)."""
    record = METHODS[method]
    given = list(model_params or [{} for _ in tensors])
    resolved_models = []
    for own in given:
        resolved = {}
        for key, default in record.model_params.items():
            value = own.get(key, default)
            assert value is not REQUIRED, f"test must give {key} for {method}"
            resolved[key] = value
        resolved_models.append(resolved)
    resolved_global = {}
    for key, default in record.global_params.items():
        value = (params or {}).get(key, default)
        assert value is not REQUIRED, f"test must give {key} for {method}"
        resolved_global[key] = value
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    inputs = MergeInputs(
        name="test.weight",
        tensors=[tensor(t, dtype) for t in tensors],
        base=tensor(base, dtype) if base is not None else None,
        model_params=resolved_models,
        params=resolved_global,
        generator=generator,
    )
    out = record.run(inputs)
    assert out.shape == inputs.tensors[0].shape
    assert out.dtype == dtype
    return out.double().numpy()


def random_family(
    shape: tuple[int, ...], n: int, seed: int = 0, scale: float = 0.1
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and n perturbed copies of it (random, so no magnitude ties)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    return base, [base + scale * rng.normal(size=shape) for _ in range(n)]

"""Fixtures for evolve tests: two tiny sources of one base, a target with a known mix, data."""

from __future__ import annotations

import pytest
import torch

from dammerge.dispatch import merge
from dammerge.testing import make_tiny_model, make_variant

from .evolve_helpers import TARGET_WEIGHTS, Sources, write_data


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> Sources:
    root = tmp_path_factory.mktemp("evolve-sources")
    base = make_tiny_model(root / "base", "llama", seed=0, num_hidden_layers=2)
    a = make_variant(base, root / "a", seed=1, scale=0.05)
    b = make_variant(base, root / "b", seed=2, scale=0.05)
    target = merge(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": TARGET_WEIGHTS["a"]}},
                {"model": str(b), "parameters": {"weight": TARGET_WEIGHTS["b"]}},
            ],
            "parameters": {"normalize": False},
        },
        root / "target",
        progress=False,
    )
    return Sources(
        base, a, b, target, write_data(root / "a.jsonl", 0), write_data(root / "b.jsonl", 40)
    )


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; on a shared 2-core CI box contention costs 5-10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Helpers shared by the evolve tests (a module of its own: tests/ is not a package)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

# The known optimum: layer 0 = 0.8 A + 0.2 B, layer 1 = 0.3 A + 0.7 B (embeddings, final norm
# and lm_head follow layer 0: tensors outside the blocks resolve gradients at depth 0).
TARGET_WEIGHTS = {"a": [0.8, 0.3], "b": [0.2, 0.7]}


@dataclass(frozen=True)
class Sources:
    base: Path
    a: Path
    b: Path
    target: Path
    data_a: Path
    data_b: Path


def write_data(path: Path, offset: int) -> Path:
    rows = [
        {
            "instruction": f"w{offset + i} w{offset + 2 * i % 50}",
            "input": f"w{i + 3}" if i % 2 else "",
            "output": f"w{(offset + 7 * i) % 100 + 3} w{(i * 11) % 100 + 3} w{i + 20}",
        }
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def logits_mse_fitness(target: Path, seed: int = 0):
    """Fitness = minus the MSE between a candidate's logits and the target's on random tokens."""
    tokens = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(target).eval()(tokens).logits

    @torch.no_grad()
    def fitness(model) -> float:
        return -float(torch.nn.functional.mse_loss(model(tokens).logits, reference))

    return fitness


def evolve_recipe(sources: Sources, **training) -> dict:
    """A linear evolve recipe over sources A and B (per-layer weights by default)."""
    settings = {"budget": 16, "popsize": 8, "layer_groups": 2, "sigma0": 0.3}
    settings.update(training)
    return {
        "merge_method": "evolve",
        "base_model": str(sources.base),
        "models": [
            {"model": str(sources.a), "dataset": {"path": str(sources.data_a)}},
            {"model": str(sources.b), "dataset": {"path": str(sources.data_b)}},
        ],
        "parameters": {"method": "linear", "normalize": False},
        "training": settings,
    }

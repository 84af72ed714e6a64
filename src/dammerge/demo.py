"""The README's main job: build checkpoints, merge them with several methods, load the results.

Until the miniature model family exists this uses small random-init Llama checkpoints and
"fine-tunes" made by perturbing them; it shows, per method, that ``transformers`` loads the
merged checkpoint and how far its logits are from each source model's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from dammerge.merge import merge
from dammerge.testing import make_family

DEMO_RECIPES: dict[str, dict] = {
    "linear": {"parameters": {"weight": 1.0}},
    "task_arithmetic": {"parameters": {"weight": 1.0}, "global": {"lambda": 0.5}},
    "ties": {"parameters": {"weight": 1.0, "density": 0.5}},
    "dare_ties": {"parameters": {"weight": 1.0, "density": 0.5}},
    "della": {"parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}},
    "model_stock": {"parameters": {}},
}


def recipe(method: str, base: Path, models: list[Path]) -> dict:
    spec = DEMO_RECIPES[method]
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": spec["parameters"]} for m in models],
        "parameters": spec.get("global", {}),
        "dtype": "float32",
    }


def run_demo(output: Path) -> None:
    console = Console()
    output = Path(output)
    models_dir = output / "models"
    if not (models_dir / "base" / "config.json").exists():
        console.print(f"building a base and 3 fine-tunes in {models_dir}")
        make_family(
            models_dir, "llama", n=3, hidden_size=128, intermediate_size=256, num_hidden_layers=4
        )
    base = models_dir / "base"
    sources = [models_dir / f"ft{i}" for i in range(3)]
    tokens = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(folder: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            return model(tokens).logits

    source_logits = [logits(s) for s in sources]
    table = Table("method", "seconds", "loads", "finite", *[f"dist to ft{i}" for i in range(3)])
    for method in DEMO_RECIPES:
        start = time.perf_counter()
        out = merge(
            recipe(method, base, sources),
            output / "merges" / method,
            overwrite=True,
            progress=False,
        )
        seconds = time.perf_counter() - start
        merged = logits(out)
        dists = [f"{(merged - s).pow(2).mean().sqrt():.4f}" for s in source_logits]
        table.add_row(method, f"{seconds:.2f}", "yes", str(bool(merged.isfinite().all())), *dists)
    console.print(table)
    console.print(f"merged checkpoints are in {output / 'merges'}")

"""Scoring one experiment cell with the per-domain evaluator (``dammerge.evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dammerge.experiment.config import EvaluationSpec
from dammerge.family.manifest import Family


def evaluate_cell(
    model: Path, family: Family, spec: EvaluationSpec, device: str, progress: bool = True
) -> dict[str, Any]:
    """``{domain: {"score", "nll", "kl"}, ..., "average": a}`` for one model folder."""
    from dammerge.evaluate import evaluate_models

    options: dict[str, Any] = {"limit": spec.limit, "batch_size": spec.batch_size}
    if spec.max_new_tokens is not None:
        options["max_new_tokens"] = spec.max_new_tokens
    result = evaluate_models([str(model)], family, device=device, progress=progress, **options)
    return result.to_json()["models"][str(model)]

"""Per-domain evaluation of merges on a model family, and the lm-evaluation-harness bridge.

Public API (imported lazily, so ``import dammerge.evaluate.metrics`` stays torch-free)::

    evaluate_models(model_dirs, family, *, limit=None, batch_size=16, ...) -> EvaluationResult
    evaluate_model(model, tokenizer, family, *, teachers=None, ...) -> dict[str, DomainScore]
    TeacherCache(device="cpu", ...)      # specialists' log-probs, shared across calls
    export_lm_eval(family, out, ...) -> LmEvalExport
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DomainScore": "dammerge.evaluate.evaluator",
    "EvaluationResult": "dammerge.evaluate.evaluator",
    "average_score": "dammerge.evaluate.evaluator",
    "evaluate_model": "dammerge.evaluate.evaluator",
    "evaluate_models": "dammerge.evaluate.evaluator",
    "TeacherCache": "dammerge.evaluate.teacher_forcing",
    "load_domains": "dammerge.evaluate.data",
    "load_model": "dammerge.evaluate.loading",
    "export_lm_eval": "dammerge.evaluate.lm_eval_bridge",
    "score_record": "dammerge.evaluate.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

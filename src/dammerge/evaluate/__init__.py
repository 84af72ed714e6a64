"""Per-domain evaluation of merges on a model family, and the lm-evaluation-harness bridge.

Public API (imported on first use, so ``import dammerge.evaluate.cli`` stays torch-free)::

    evaluate_models(model_dirs, family, *, limit=None, batch_size=16, ...) -> EvaluationResult
    evaluate_model(model, tokenizer, family, *, teachers=None, ...) -> dict[str, DomainScore]
    TeacherCache(device="cpu", ...)      # specialists' log-probs, shared across calls
    export_lm_eval(family, out, ...) -> LmEvalExport

The metrics, likelihoods and generation it scores with live in :mod:`dammerge.scoring`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DomainScore": "evaluator",
    "EvaluationResult": "evaluator",
    "average_score": "evaluator",
    "evaluate_model": "evaluator",
    "evaluate_models": "evaluator",
    "TeacherCache": "teacher_forcing",
    "load_domains": "data",
    "load_model": "loading",
    "export_lm_eval": "lm_eval_bridge",
    "score_record": "metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public names, importing the evaluator's modules on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from dammerge.evaluate import data, evaluator, lm_eval_bridge, loading, teacher_forcing
    from dammerge.scoring import metrics

    modules = {
        "data": data,
        "evaluator": evaluator,
        "lm_eval_bridge": lm_eval_bridge,
        "loading": loading,
        "metrics": metrics,
        "teacher_forcing": teacher_forcing,
    }
    return getattr(modules[_EXPORTS[name]], name)

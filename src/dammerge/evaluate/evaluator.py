"""Per-domain evaluation of language models on a family: task score, response NLL, KL to specialist.

Two entry points:

- :func:`evaluate_model` scores one model already in memory (evolutionary search scores a
  candidate merged in memory, without writing it);
- :func:`evaluate_models` checks and scores model folders one after another (the CLI, the
  experiment runner), sharing one :class:`TeacherCache` so each specialist's log-probs are
  computed once per call, however many models are compared.

Per domain: ``score`` is the domain's primary metric in [0, 1] (maths exact match, SQL execution
accuracy, translation chrF; :func:`dammerge.scoring.metrics.score_record`) of greedy
generations; ``nll`` the token-weighted mean negative log-likelihood of the reference responses
(response tokens and the closing EOS, teacher-forced, prompt excluded); ``kl`` the
token-weighted mean KL(specialist ‖ model) over the same tokens. The compositional set has a
score and an NLL but no specialist, so no KL. ``average`` is the mean score over the family's
specialist domains (lang, math, sql); the compositional set is reported beside it, not in it,
because no specialist was trained on it and it would blur the "keeps each skill" reading.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge import __version__
from dammerge.data.examples import pad_id
from dammerge.devices import resolve_device
from dammerge.errors import DammergeError
from dammerge.evaluate.data import (
    COMPOSITIONAL,
    DomainData,
    encode_examples,
    encode_prompts,
    load_domains,
)
from dammerge.evaluate.loading import check_model_dir, load_model, resolve_dtype
from dammerge.evaluate.teacher_forcing import TeacherCache
from dammerge.family.manifest import Family, load_family
from dammerge.memory import reuse_freed_memory
from dammerge.scoring.generation import DEFAULT_MAX_NEW_TOKENS, context_limit, generate_responses
from dammerge.scoring.metrics import score_record
from dammerge.scoring.teacher_forcing import (
    LikelihoodTotals,
    iter_response_logprobs,
    response_targets,
)


@dataclass(frozen=True)
class DomainScore:
    """One model's result on one domain (None where not computed or not defined)."""

    score: float | None
    nll: float | None
    kl: float | None
    count: int = 0
    responses: tuple[str, ...] = field(default=(), repr=False, compare=False)
    record_scores: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, float | None]:
        """The JSON form: ``{"score": s, "nll": n, "kl": k}``."""
        return {"score": self.score, "nll": self.nll, "kl": self.kl}


def average_score(scores: dict[str, DomainScore]) -> float | None:
    """Mean primary score over the specialist domains (compositional excluded)."""
    values = [s.score for name, s in scores.items() if name != COMPOSITIONAL]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


@dataclass
class EvaluationResult:
    """Scores of several models, keyed by the model folder as the caller named it."""

    models: dict[str, dict[str, DomainScore]]
    labels: dict[str, str]
    domains: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    record_ids: dict[str, list[str]] = field(default_factory=dict)

    def average(self, model: str) -> float | None:
        return average_score(self.models[model])

    def to_json(self) -> dict[str, Any]:
        """``{"models": {dir: {domain: {"score", "nll", "kl"}, ..., "average": a}},
        "labels": {dir: label}, "settings": {...}}``: the scores, each model's label (``--names``)
        and the settings that produced them, so a saved file says what it measured."""
        out: dict[str, Any] = {}
        for key, scores in self.models.items():
            entry: dict[str, Any] = {name: s.to_dict() for name, s in scores.items()}
            entry["average"] = self.average(key)
            out[key] = entry
        labels = {key: self.labels.get(key, key) for key in self.models}
        return {"models": out, "labels": labels, "settings": dict(self.settings)}


def _family_data(
    family: Family | str | Path | dict[str, DomainData],
    *,
    split: str,
    limit: int | None,
    domains: list[str] | None,
) -> dict[str, DomainData]:
    if isinstance(family, dict):
        return family
    if not isinstance(family, Family):
        family = load_family(family)
    return load_domains(family, split=split, limit=limit, domains=domains)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rec", disable=not enabled, leave=False, delay=0.5)


def _generate_and_score(
    model: Any,
    tokenizer: Any,
    domain: DomainData,
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int], None],
) -> tuple[list[str], list[float]]:
    prompts = encode_prompts(tokenizer, domain.records)
    responses = generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        on_batch=on_batch,
    )
    scores = [
        score_record(domain.metric, response, record)
        for response, record in zip(responses, domain.records, strict=True)
    ]
    return responses, scores


def _likelihoods(
    model: Any,
    tokenizer: Any,
    domain: DomainData,
    teacher_rows: list[torch.Tensor] | None,
    *,
    batch_size: int,
    on_batch: Callable[[int], None],
) -> tuple[float | None, float | None]:
    """(NLL, KL) of the domain's reference responses; KL None without a comparable teacher."""
    examples = encode_examples(tokenizer, domain.records)
    limit = context_limit(model)
    totals = LikelihoodTotals()
    comparable = teacher_rows is not None
    for index, rows in iter_response_logprobs(
        model, examples, pad=pad_id(tokenizer), batch_size=batch_size, on_batch=on_batch
    ):
        teacher = teacher_rows[index] if teacher_rows is not None else None
        # Different vocabulary size or context length: the rows are not comparable.
        comparable = comparable and teacher is not None and teacher.shape == rows.shape
        totals.add(rows, response_targets(examples[index], limit), teacher if comparable else None)
    return totals.nll(), totals.kl() if comparable else None


@torch.no_grad()
def evaluate_model(
    model: Any,
    tokenizer: Any,
    family: Family | str | Path | dict[str, DomainData],
    *,
    split: str = "eval",
    limit: int | None = None,
    domains: list[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    teachers: TeacherCache | None = None,
    generate: bool = True,
    likelihood: bool = True,
    progress: bool = True,
    label: str = "model",
) -> dict[str, DomainScore]:
    """Score an in-memory ``transformers`` causal LM on each domain of ``family``.

    ``family`` is a family folder, a loaded :class:`Family`, or records already loaded with
    :func:`dammerge.evaluate.data.load_domains` (cheapest when called many times).
    ``teachers`` caches the specialists' log-probs across calls; pass the same one to score
    many candidates. ``generate=False`` skips generation (score None; NLL/KL only), and
    ``likelihood=False`` skips NLL and KL. The model is left in eval mode.
    """
    data = _family_data(family, split=split, limit=limit, domains=domains)
    if teachers is None and likelihood:
        teachers = TeacherCache(
            device=str(next(model.parameters()).device),
            dtype=next(model.parameters()).dtype,
            batch_size=batch_size,
            progress=progress,
        )
    model.eval()
    stages = int(generate) + int(likelihood)
    total = stages * sum(len(domain.records) for domain in data.values())
    results: dict[str, DomainScore] = {}
    with _progress(total, label, progress) as bar:
        for name, domain in data.items():
            responses: list[str] = []
            scores: list[float] = []
            if generate:
                bar.set_postfix_str(f"{name}: generating", refresh=True)
                responses, scores = _generate_and_score(
                    model,
                    tokenizer,
                    domain,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    on_batch=bar.update,
                )
            nll = kl = None
            if likelihood:
                assert teachers is not None
                teacher_rows = teachers.rows(domain, tokenizer)
                bar.set_postfix_str(f"{name}: nll/kl", refresh=True)
                nll, kl = _likelihoods(
                    model,
                    tokenizer,
                    domain,
                    teacher_rows,
                    batch_size=batch_size,
                    on_batch=bar.update,
                )
            results[name] = DomainScore(
                score=sum(scores) / len(scores) if generate else None,
                nll=nll,
                kl=kl,
                count=len(domain.records),
                responses=tuple(responses),
                record_scores=tuple(scores),
            )
    return results


def resolve_model_dirs(models: Sequence[str | Path], family: Family | None) -> dict[str, Path]:
    """Map each model argument to its folder; a family model's name ('lang') also works."""
    resolved: dict[str, Path] = {}
    for arg in models:
        key = str(arg)
        if key in resolved:
            raise DammergeError(f"model {key} is given twice", "name each model once")
        path = Path(arg)
        if not path.exists() and family is not None and key in family.models:
            path = family.models[key]
        resolved[key] = path
    return resolved


def evaluate_models(
    model_dirs: Sequence[str | Path],
    family: Family | str | Path,
    *,
    names: Sequence[str] | None = None,
    limit: int | None = None,
    domains: list[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    generate: bool = True,
    likelihood: bool = True,
    progress: bool = True,
) -> EvaluationResult:
    """Check every model folder and the family, then score each model in turn.

    Models are loaded one at a time (memory stays that of one model plus one specialist);
    each specialist's log-probs are computed once for all models. Results are keyed by the
    model arguments as given (``names`` only changes the labels shown in tables and plots).
    """
    if not isinstance(family, Family):
        family = load_family(family)
    data = load_domains(family, limit=limit, domains=domains)
    paths = resolve_model_dirs(model_dirs, family)
    if names is not None and len(names) != len(paths):
        raise DammergeError(
            f"{len(names)} names for {len(paths)} models", "give one name per model, in order"
        )
    if batch_size < 1 or max_new_tokens < 1:
        raise DammergeError("--batch-size and --max-new-tokens must be at least 1")
    for path in paths.values():
        check_model_dir(path)
    for domain in data.values():
        if likelihood and domain.specialist_dir is not None:
            check_model_dir(domain.specialist_dir)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    labels = dict(zip(paths, names or list(paths), strict=True))
    teachers = TeacherCache(
        device=str(torch_device), dtype=torch_dtype, batch_size=batch_size, progress=progress
    )
    result = EvaluationResult(
        models={},
        labels=labels,
        domains=list(data),
        settings={
            "limit": limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "device": str(torch_device),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "family": str(family.root),
            "decoding": "greedy",  # deterministic: no sampling, so no seed
            "dammerge_version": __version__,
        },
        record_ids={
            name: [str(r.get("id", i)) for i, r in enumerate(d.records)] for name, d in data.items()
        },
    )
    with reuse_freed_memory():  # one model after another: reuse the last one's pages
        for key, path in paths.items():
            start = time.perf_counter()
            model, tokenizer = load_model(path, device=torch_device, dtype=torch_dtype)
            result.models[key] = evaluate_model(
                model,
                tokenizer,
                data,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                teachers=teachers,
                generate=generate,
                likelihood=likelihood,
                progress=progress,
                label=labels[key],
            )
            del model
            result.seconds[key] = time.perf_counter() - start
    return result

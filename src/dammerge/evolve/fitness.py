"""Fitness functions: how good is one candidate merge (higher is better).

The search only needs ``fitness(model) -> FitnessValue``; anything with that shape plugs in (a
plain ``model -> float`` callable is wrapped). Two are built in:

- ``kl`` (default): minus the mean, over source models, of KL(teacher_i ‖ candidate) on the
  response tokens of a held-in subset of model i's representative data (its ``dataset:``
  block, read and encoded by :mod:`dammerge.data` as DAM reads it: alpaca, chat or raw). The
  teachers never change, so their log-probabilities are computed once at the start and kept in
  memory (response positions only: about ``tokens × vocab × 4`` bytes per source).
- ``task``: the mean per-domain score of ``dammerge.evaluate.evaluate_model`` (imported lazily,
  so evolve works without the evaluator) on the family's *training* records (``task_split``),
  never the sets the final evaluation scores. It calls ``evaluate_model(model, tokenizer,
  family, limit=..., **evaluate_kwargs)``; any scorer with that shape can be passed instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dammerge.data.examples import Batch, Example, collate, encode_dataset, pad_id
from dammerge.data.records import opened_records
from dammerge.data.spec import DatasetSpec, require_dataset
from dammerge.errors import ConfigError, DammergeError
from dammerge.evolve.settings import EvolveSettings
from dammerge.scoring.divergence import kl_per_position, log_probs

EXCLUDED_TASK_KEYS = ("average", "compositional")


@dataclass
class FitnessValue:
    """A score (higher is better) and the forward work it took."""

    score: float
    sequences: int = 0
    tokens: int = 0


@dataclass
class FitnessContext:
    """What a fitness may use once, before the search starts.

    ``load_source(i)`` puts participant ``i``'s own weights into ``model`` (so teachers need no
    second copy of any model); candidates overwrite them later.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    load_source: Callable[[int], None]
    source_names: list[str]


@runtime_checkable
class Fitness(Protocol):
    name: str

    def setup(self, context: FitnessContext) -> FitnessValue:
        """Prepare (e.g. cache teacher outputs); returns the forward work done."""
        ...

    def __call__(self, model: PreTrainedModel) -> FitnessValue: ...


class CallableFitness:
    """Wraps ``model -> float | FitnessValue`` (tests, quick experiments)."""

    name = "callable"

    def __init__(self, function: Callable[[PreTrainedModel], float | FitnessValue]) -> None:
        self.function = function

    def setup(self, context: FitnessContext) -> FitnessValue:
        return FitnessValue(0.0)

    def __call__(self, model: PreTrainedModel) -> FitnessValue:
        value = self.function(model)
        return value if isinstance(value, FitnessValue) else FitnessValue(float(value))


def as_fitness(fitness: Fitness | Callable[[PreTrainedModel], Any]) -> Fitness:
    if isinstance(fitness, Fitness):
        return fitness
    return CallableFitness(fitness)


# --------------------------------------------------------------------------- data


def held_in(records: Sequence[Any], count: int, seed: int) -> list[Any]:
    """A seeded random subset (the search's held-in data), in a fixed order."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:count]]


def held_in_examples(
    model: str,
    spec: DatasetSpec,
    *,
    count: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> list[Example]:
    """A source's held-in records, read, checked and encoded (response tokens are the targets).

    ``count`` records are drawn unless the dataset block sets its own ``samples``. Every
    mistake in the data (missing file or field, nothing left after truncation) is reported
    here, before any model is loaded.
    """
    where = f"model {model}"
    with opened_records(spec, where=where) as records:
        chosen = held_in(records, spec.samples or count, seed)
    return encode_dataset(
        chosen, spec, tokenizer, loss_on="response", max_length=max_length, where=where
    )


# --------------------------------------------------------------------------- KL fitness


class KLFitness:
    """Minus the mean KL(teacher_i ‖ candidate) over sources, on held-in response tokens.

    The KL is :func:`dammerge.scoring.divergence.kl_per_position` of log-probs at temperature
    ``T`` (no ``T²`` factor), averaged over each source's response tokens.
    """

    name = "kl"

    def __init__(
        self, examples: list[list[Example]], *, batch_size: int = 8, temperature: float = 1.0
    ) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.temperature = temperature
        self.batches: list[list[Batch]] = []
        self.teachers: list[list[torch.Tensor]] = []

    @torch.inference_mode()
    def setup(self, context: FitnessContext) -> FitnessValue:
        work = FitnessValue(0.0)
        pad = pad_id(context.tokenizer)
        self.batches, self.teachers = [], []
        for index, examples in enumerate(self.examples):
            batches = [
                collate(examples[start : start + self.batch_size], [], pad).to(context.device)
                for start in range(0, len(examples), self.batch_size)
            ]
            context.load_source(index)
            self.teachers.append([self._log_probs(context.model, batch) for batch in batches])
            for batch in batches:
                work.sequences += batch.input_ids.shape[0]
                work.tokens += batch.tokens
            self.batches.append(batches)
        return work

    def _log_probs(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return log_probs(logits[batch.loss_mask], self.temperature)

    @torch.inference_mode()
    def __call__(self, model: PreTrainedModel) -> FitnessValue:
        assert self.teachers, "setup() must run before scoring"
        value = FitnessValue(0.0)
        divergences = []
        for batches, teachers in zip(self.batches, self.teachers, strict=True):
            total, count = 0.0, 0
            for batch, teacher in zip(batches, teachers, strict=True):
                kl = kl_per_position(teacher, self._log_probs(model, batch))
                total += float(kl.sum())
                count += kl.numel()
                value.sequences += batch.input_ids.shape[0]
                value.tokens += batch.tokens
            divergences.append(total / count)
        value.score = -sum(divergences) / len(divergences)
        return value


def kl_fitness_from_recipe(
    settings: EvolveSettings,
    datasets: Sequence[tuple[str, DatasetSpec | None]],
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
) -> KLFitness:
    """Read, subsample and encode every source's dataset (errors here come before any compute)."""
    examples = [
        held_in_examples(
            model,
            require_dataset(model, spec, "fitness: kl"),
            count=settings.samples,
            seed=seed,
            tokenizer=tokenizer,
            max_length=settings.max_length,
        )
        for model, spec in datasets
    ]
    return KLFitness(examples, batch_size=settings.batch_size, temperature=settings.temperature)


# --------------------------------------------------------------------------- task fitness

Scorer = Callable[..., dict[str, Any]]


def default_scorer() -> Scorer:
    """``dammerge.evaluate.evaluate_model``, imported only when a task fitness is asked for."""
    try:
        from dammerge.evaluate import evaluate_model  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError(
            "fitness: task needs dammerge.evaluate.evaluate_model, which this installation lacks",
            "use fitness: kl",
        ) from None
    return evaluate_model


def _score_of(result: Any) -> float:
    score = getattr(result, "score", result)
    if isinstance(score, dict):
        score = score.get("score")
    if score is None:
        raise DammergeError(
            "the evaluator returned no task score (generation was switched off?)",
            "do not pass generate: false in training.evaluate_kwargs",
        )
    return float(score)


class TaskFitness:
    """The mean per-domain score of the evaluator on the miniature family's tasks."""

    name = "task"

    def __init__(
        self,
        family: Any,
        *,
        limit: int | None,
        domains: Sequence[str] | None = None,
        evaluate_kwargs: dict[str, Any] | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self.family = family
        self.limit = limit
        self.domains = list(domains) if domains else None
        self.evaluate_kwargs = dict(evaluate_kwargs or {})
        self.scorer = scorer or default_scorer()
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def setup(self, context: FitnessContext) -> FitnessValue:
        self.tokenizer = context.tokenizer
        return FitnessValue(0.0)

    def __call__(self, model: PreTrainedModel) -> FitnessValue:
        results = self.scorer(
            model, self.tokenizer, self.family, limit=self.limit, **self.evaluate_kwargs
        )
        keys = self.domains or [k for k in results if k not in EXCLUDED_TASK_KEYS]
        missing = [k for k in keys if k not in results]
        if missing or not keys:
            raise DammergeError(
                f"the evaluator returned no score for domain {missing[0] if missing else '?'}",
                f"it returned: {', '.join(results) or 'nothing'}",
            )
        scores = [_score_of(results[k]) for k in keys]
        return FitnessValue(sum(scores) / len(scores), sequences=len(keys) * (self.limit or 0))


def task_fitness_from_recipe(settings: EvolveSettings, scorer: Scorer | None = None) -> TaskFitness:
    """The task fitness of a recipe, with the family's held-in records loaded once.

    With the built-in evaluator the records of ``task_split`` (default ``train``: never the
    sets the final evaluation scores) are loaded here, once, and only generation is scored
    (``likelihood: false``) unless ``evaluate_kwargs`` says otherwise.
    """
    from dammerge.family.manifest import load_family

    if settings.family is None:
        raise ConfigError(
            "fitness: task needs training.family (a folder built by `dammerge family build`)"
        )
    family = load_family(Path(settings.family).expanduser())
    if settings.task_domains:
        unknown = [d for d in settings.task_domains if d not in family.domains]
        if unknown:
            raise ConfigError(
                f"training.task_domains: family has no domain {unknown[0]!r}",
                f"domains: {', '.join(family.domains)}",
            )
    kwargs = dict(settings.evaluate_kwargs)
    target: Any = family
    if scorer is None:
        scorer = default_scorer()
        from dammerge.evaluate import load_domains  # type: ignore[attr-defined]

        target = load_domains(
            family,
            split=settings.task_split,
            limit=settings.task_limit,
            domains=settings.task_domains,
            compositional=False,
        )
        kwargs = {"likelihood": False, "progress": False, **kwargs}
    return TaskFitness(
        target,
        limit=settings.task_limit,
        domains=settings.task_domains,
        evaluate_kwargs=kwargs,
        scorer=scorer,
    )

"""Fitness functions: how good is one candidate merge (higher is better).

The search only needs ``fitness(model) -> FitnessValue``; anything with that shape plugs in (a
plain ``model -> float`` callable is wrapped). Two are built in:

- ``kl`` (default): minus the mean, over source models, of KL(teacher_i ‖ candidate) on the
  response tokens of a held-in subset of model i's representative data (Alpaca prompts). The
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dammerge.errors import ConfigError, DammergeError
from dammerge.evolve.settings import DatasetSpec, EvolveSettings
from dammerge.family.manifest import read_jsonl
from dammerge.templates import alpaca_prompt

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


@dataclass
class Example:
    prompt: str
    response: str


def load_examples(spec: DatasetSpec, model: str) -> list[Example]:
    """All Alpaca-style records of a JSONL dataset, with the recipe's field mapping applied."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"dataset of {model} not found: {path}",
            "dataset.path is a JSONL file of {instruction, input, output} records",
        )
    if path.suffix not in (".jsonl", ".json"):
        raise ConfigError(
            f"dataset of {model}: evolve reads JSONL files, not {path.suffix or 'folders'}",
            "convert the data to JSON lines with instruction/input/output fields",
        )
    names = {key: spec.fields.get(key, key) for key in ("instruction", "input", "output")}
    examples = []
    for number, record in enumerate(read_jsonl(path), 1):
        for key in ("instruction", "output"):
            if not isinstance(record.get(names[key]), str):
                raise ConfigError(
                    f"{path}: record {number} has no text field {names[key]!r}",
                    "map your field names with dataset.fields: {instruction: ..., output: ...}",
                )
        extra = record.get(names["input"], "") or ""
        prompt = alpaca_prompt(record[names["instruction"]], str(extra))
        examples.append(Example(prompt, record[names["output"]]))
    if not examples:
        raise ConfigError(f"dataset of {model} is empty: {path}")
    return examples


def held_in(examples: Sequence[Example], count: int, seed: int) -> list[Example]:
    """A seeded random subset (the search's held-in data), in a fixed order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:count]]


@dataclass
class Batch:
    """Padded token ids and the positions whose logits predict a response token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    teacher: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def encode(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int
) -> tuple[list[int], int] | None:
    """Token ids of prompt + response + EOS and where the response starts (None if cut off)."""
    prompt_ids = list(tokenizer(example.prompt)["input_ids"])
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (prompt_ids + response_ids + eos)[:max_length]
    start = len(prompt_ids)
    return (ids, start) if len(ids) > start else None


def make_batches(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> list[Batch]:
    encoded = [e for e in (encode(tokenizer, x, max_length) for x in examples) if e is not None]
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for offset in range(0, len(encoded), batch_size):
        chunk = encoded[offset : offset + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (ids, start) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            targets[row, start - 1 : len(ids) - 1] = True  # logits at p predict token p + 1
        batches.append(Batch(input_ids.to(device), attention.to(device), targets.to(device)))
    return batches


# --------------------------------------------------------------------------- KL fitness


class KLFitness:
    """Minus the mean KL(teacher_i ‖ candidate) over sources, on held-in response tokens."""

    name = "kl"

    def __init__(
        self,
        examples: list[list[Example]],
        *,
        batch_size: int = 8,
        max_length: int = 512,
        temperature: float = 1.0,
    ) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.max_length = max_length
        self.temperature = temperature
        self.batches: list[list[Batch]] = []

    @torch.inference_mode()
    def setup(self, context: FitnessContext) -> FitnessValue:
        work = FitnessValue(0.0)
        self.batches = []
        for index, examples in enumerate(self.examples):
            batches = make_batches(
                context.tokenizer, examples, self.batch_size, self.max_length, context.device
            )
            if not batches:
                raise ConfigError(
                    f"no held-in example of {context.source_names[index]} has a response "
                    f"within max_length={self.max_length} tokens",
                    "raise training.max_length",
                )
            context.load_source(index)
            for batch in batches:
                batch.teacher = self._log_probs(context.model, batch)
                work.sequences += batch.input_ids.shape[0]
                work.tokens += batch.tokens
            self.batches.append(batches)
        return work

    def _log_probs(self, model: PreTrainedModel, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        selected = logits[batch.target_mask].float() / self.temperature
        return F.log_softmax(selected, dim=-1)

    @torch.inference_mode()
    def __call__(self, model: PreTrainedModel) -> FitnessValue:
        value = FitnessValue(0.0)
        divergences = []
        for batches in self.batches:
            total, count = 0.0, 0
            for batch in batches:
                assert batch.teacher is not None, "setup() must run before scoring"
                student = self._log_probs(model, batch)
                kl = F.kl_div(student, batch.teacher, log_target=True, reduction="none").sum(-1)
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
) -> KLFitness:
    """Read and subsample every source's dataset (errors here come before any compute)."""
    examples = []
    for model, spec in datasets:
        if spec is None:
            raise ConfigError(
                f"model {model} has no dataset, which fitness: kl needs",
                "add dataset: {path: FILE.jsonl} to every model in the recipe",
            )
        count = spec.samples or settings.samples
        examples.append(held_in(load_examples(spec, model), count, seed))
    return KLFitness(
        examples,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        temperature=settings.temperature,
    )


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

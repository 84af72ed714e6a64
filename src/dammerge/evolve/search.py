"""CMA-ES over a normalised genome, with a replayable log and optional parallel scoring.

CMA-ES (the ``cma`` package) searches ``[0, 1]^D``; the search space maps that to parameter
bounds. ``cma`` draws its samples from NumPy's *global* random state, so the search keeps its own
copy of that state and swaps it in around every call into ``cma``: nothing else that uses NumPy
can shift the search, and replaying a log reproduces the same candidates exactly.

Scoring runs in this process (``workers: 1``, torch uses all its threads) or in a pool of
forked worker processes that inherit the in-memory sources, the model and the cached teacher
outputs (copy-on-write) and each use one thread.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cma
import numpy as np
import torch
from tqdm.auto import tqdm

from dammerge.errors import DammergeError
from dammerge.evolve.fitness import FitnessValue
from dammerge.evolve.log import EvalRecord, EvolveLog

Outcome = tuple[FitnessValue | None, float, str | None]  # value, seconds, error
Evaluator = Callable[[Sequence[float]], Outcome]


class IsolatedNumpyRandom:
    """Context manager that gives ``cma`` a private NumPy global random state."""

    def __init__(self) -> None:
        self.state: Any = None

    def __enter__(self) -> IsolatedNumpyRandom:
        self._outer = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state = np.random.get_state()
        np.random.set_state(self._outer)


def cma_seed(seed: int) -> int:
    """A positive seed for ``cma`` (its seed 0 means 'use the clock')."""
    return seed % (2**31 - 2) + 1


# --------------------------------------------------------------------------- scoring

_WORKER_EVALUATOR: Evaluator | None = None


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _score_in_worker(x: Sequence[float]) -> Outcome:
    assert _WORKER_EVALUATOR is not None
    return _WORKER_EVALUATOR(x)


class Scorer:
    """Scores a list of genomes in order, in-process or in forked workers."""

    def __init__(self, evaluator: Evaluator, workers: int) -> None:
        global _WORKER_EVALUATOR
        self.evaluator = evaluator
        self.pool = None
        if workers > 1:
            if "fork" not in multiprocessing.get_all_start_methods():
                warnings.warn("no fork() here: evolve scores candidates sequentially", stacklevel=2)
                return
            _WORKER_EVALUATOR = evaluator  # inherited by the forked workers
            context = multiprocessing.get_context("fork")
            self.pool = context.Pool(workers, initializer=_init_worker, initargs=(1,))

    def map(self, genomes: list[Sequence[float]]) -> Iterator[Outcome]:
        if self.pool is None or len(genomes) <= 1:
            return (self.evaluator(x) for x in genomes)
        return self.pool.imap(_score_in_worker, genomes)

    def close(self) -> None:
        global _WORKER_EVALUATOR
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        _WORKER_EVALUATOR = None


# --------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    records: list[EvalRecord]
    best: EvalRecord
    new_evaluations: int
    generations: int
    stop_reason: str


def best_record(records: Sequence[EvalRecord]) -> EvalRecord | None:
    """The highest fitness; the earliest wins ties (so replays pick the same one)."""
    scored = [r for r in records if r.fitness is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (r.fitness, -r.evaluation))


def run_cma(
    *,
    x0: np.ndarray,
    sigma0: float,
    popsize: int,
    budget: int,
    seed: int,
    log: EvolveLog,
    scorer: Scorer,
    describe: Callable[[np.ndarray], dict[str, float]],
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) CMA-ES for ``budget // popsize`` generations."""
    rng = IsolatedNumpyRandom()
    options = {
        "bounds": [0.0, 1.0],
        "popsize": popsize,
        "seed": cma_seed(seed),
        "verbose": -9,
    }
    with rng, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es = cma.CMAEvolutionStrategy(list(x0), sigma0, options)
    generations = budget // popsize
    new = 0
    stop_reason = "budget"
    bar = tqdm(
        total=generations * popsize,
        initial=min(len(log.records), generations * popsize),
        desc="evolve",
        unit="eval",
        disable=not progress,
    )
    done = 0
    try:
        for generation in range(generations):
            if es.stop():
                stop_reason = ", ".join(f"{k}={v}" for k, v in es.stop().items())
                break
            with rng, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                candidates = es.ask()
            records, scored = _score_generation(generation, candidates, log, scorer, describe, bar)
            new += scored
            done += 1
            best = best_record(log.records)
            if best is not None:
                bar.set_postfix(best=f"{best.fitness:.5g}")
            with rng, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                es.tell(candidates, [r.loss for r in records])
    finally:
        bar.close()
    best = best_record(log.records)
    assert best is not None  # a generation where everything failed raises
    return SearchResult(list(log.records), best, new, done, stop_reason)


def _score_generation(
    generation: int,
    candidates: list[np.ndarray],
    log: EvolveLog,
    scorer: Scorer,
    describe: Callable[[np.ndarray], dict[str, float]],
    bar: tqdm,
) -> tuple[list[EvalRecord], int]:
    """Records of one generation (logged ones reused, the rest scored); and how many new."""
    slots: list[EvalRecord | None] = []
    for index, x in enumerate(candidates):
        logged = log.get(generation, index)
        if logged is not None and not np.array_equal(np.asarray(logged.x), x):
            raise DammergeError(
                f"{log.path}: generation {generation} candidate {index} differs from the "
                "logged one, so the log cannot be replayed",
                "pass --overwrite to start the search again",
            )
        slots.append(logged)
    todo = [i for i, r in enumerate(slots) if r is None]
    outcomes = scorer.map([candidates[i].tolist() for i in todo])
    for index, (value, seconds, error) in zip(todo, outcomes, strict=True):
        record = EvalRecord(
            generation=generation,
            index=index,
            evaluation=len(log.records),
            x=candidates[index].tolist(),
            params=describe(candidates[index]),
            fitness=None if value is None else float(value.score),
            seconds=round(seconds, 6),
            sequences=0 if value is None else value.sequences,
            tokens=0 if value is None else value.tokens,
            error=error,
        )
        log.append(record)
        slots[index] = record
        bar.update(1)
    records = [r for r in slots if r is not None]
    if all(r.fitness is None for r in records):
        raise DammergeError(
            f"every candidate of generation {generation} failed: {records[0].error}",
            "check the recipe's fixed parameters and the bounds",
        )
    return records, len(todo)

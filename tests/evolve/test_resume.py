"""A killed search resumes from its log: nothing recomputed, the same result as one run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dammerge.errors import DammergeError
from dammerge.evolve import evolve_merge

from .evolve_helpers import evolve_recipe, logits_mse_fitness


class Killed(Exception):
    """Stands in for the process dying mid-search."""


class CountingFitness:
    def __init__(self, fitness, die_after: int | None = None) -> None:
        self.fitness, self.die_after, self.calls = fitness, die_after, 0

    def __call__(self, model) -> float:
        if self.die_after is not None and self.calls >= self.die_after:
            raise Killed
        self.calls += 1
        return self.fitness(model)


def _log(folder):
    rows = [json.loads(line) for line in (folder / "evolve_log.jsonl").read_text().splitlines()]
    return [(r["generation"], r["index"], r["x"], r["fitness"], r["params"]) for r in rows[1:]]


def test_resumed_search_equals_uninterrupted_one(sources, tmp_path):
    recipe = evolve_recipe(sources, budget=30, popsize=6)
    base_fitness = logits_mse_fitness(sources.target)

    whole = CountingFitness(base_fitness)
    evolve_merge(recipe, tmp_path / "whole", fitness=whole, progress=False)
    assert whole.calls == 30

    dying = CountingFitness(base_fitness, die_after=13)  # mid-generation (popsize 6)
    with pytest.raises(Killed):
        evolve_merge(recipe, tmp_path / "resumed", fitness=dying, progress=False)
    assert not (tmp_path / "resumed").exists()
    work = tmp_path / "resumed.evolve-work"
    assert len(_log(work)) == 13
    with (work / "evolve_log.jsonl").open("a") as handle:
        handle.write('{"generation": 2, "ind')  # torn last line of a killed write

    rest = CountingFitness(base_fitness)
    evolve_merge(recipe, tmp_path / "resumed", fitness=rest, progress=False)
    assert rest.calls == 30 - 13  # finished evaluations are replayed, not recomputed
    assert _log(tmp_path / "resumed") == _log(tmp_path / "whole")
    assert (tmp_path / "resumed" / "evolved_recipe.yml").read_text() == (
        tmp_path / "whole" / "evolved_recipe.yml"
    ).read_text()
    whole_tensors = load_file(tmp_path / "whole" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "resumed" / "model.safetensors").items():
        assert torch.equal(tensor, whole_tensors[name])
    stats = json.loads((tmp_path / "resumed" / "evolve_stats.json").read_text())
    assert stats["resumed_evaluations"] == 13 and stats["evaluations_this_run"] == 17


def test_log_of_a_different_search_is_not_replayed(sources, tmp_path):
    fitness = CountingFitness(logits_mse_fitness(sources.target), die_after=3)
    with pytest.raises(Killed):
        evolve_merge(evolve_recipe(sources), tmp_path / "out", fitness=fitness, progress=False)
    changed = evolve_recipe(sources, sigma0=0.1)
    with pytest.raises(DammergeError, match="log of a different search"):
        evolve_merge(changed, tmp_path / "out", fitness=fitness, progress=False)
    fresh = CountingFitness(logits_mse_fitness(sources.target))
    evolve_merge(changed, tmp_path / "out", fitness=fresh, overwrite=True, progress=False)
    assert fresh.calls == 16  # --overwrite starts the search again


def test_parallel_workers_give_the_sequential_result(sources, tmp_path):
    fitness = logits_mse_fitness(sources.target)
    results = [
        evolve_merge(
            evolve_recipe(sources, budget=16, workers=workers),
            tmp_path / f"w{workers}",
            fitness=fitness,
            progress=False,
        )
        for workers in (1, 2)
    ]
    sequential, parallel = (_log(tmp_path / f"w{w}") for w in (1, 2))
    assert [r[:3] for r in parallel[:8]] == [r[:3] for r in sequential[:8]]  # same candidates
    for (*_, f_par, _p), (*_, f_seq, _q) in zip(parallel, sequential, strict=True):
        assert f_par == pytest.approx(f_seq, rel=1e-6)
    assert results[1].stats["workers"] == 2
    assert results[0].recipe == results[1].recipe

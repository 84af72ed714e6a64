"""Bad input fails with one line, before any model is loaded or anything is written."""

from __future__ import annotations

import pytest

import dammerge.evolve.run as evolve_run
from dammerge.errors import DammergeError
from dammerge.evolve import evolve_merge

from .evolve_helpers import evolve_recipe


def _set(path: str, value):
    def mutate(recipe: dict, sources) -> None:
        *parents, last = path.split(".")
        node = recipe
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value(sources) if callable(value) else value

    return mutate


CASES = {
    "unknown base method": (_set("parameters.method", "tiess"), "unknown merge_method 'tiess'"),
    "no base method": (_set("parameters", {}), "needs parameters.method"),
    "nothing to search": (_set("parameters.method", "model_stock"), "no parameter that evolve"),
    "missing dataset": (_set("models.1.dataset", KeyError), "has no dataset, which fitness: kl"),
    "dataset file missing": (
        _set("models.0.dataset", {"path": "/nonexistent/data.jsonl"}),
        "dataset of .* not found",
    ),
    "unknown dataset key": (
        _set("models.0.dataset", lambda s: {"path": str(s.data_a), "format": "x"}),
        "format: Extra inputs",
    ),
    "budget below popsize": (_set("training.budget", 5), r"budget \(5\) is smaller"),
    "unknown training key": (_set("training.generations", 3), "generations: Extra inputs"),
    "bad bounds": (_set("training.bounds", {"weight": [1, 0]}), "low < high"),
    "search unknown parameter": (
        _set("training.search", ["density"]),
        "linear has no searchable parameter 'density'",
    ),
    "searched parameter also fixed": (
        _set("models.0.parameters", {"weight": 0.5}),
        "sets 'weight', which the search tunes",
    ),
    "too many layer groups": (_set("training.layer_groups", 3), "layer_groups is 3"),
    "filter matching nothing": (_set("training.module_groups", ["cross_attn"]), "matches no"),
    "slerp with two models": (_set("parameters", {"method": "slerp"}), "slerp takes at most 1"),
    "task fitness without family": (_set("training.fitness", "task"), "needs training.family"),
    "model folder missing": (_set("models.1.model", "/nonexistent/model"), "not found"),
    "unknown chat template": (_set("chat_template", "chatmll"), "unknown chat_template"),
    "tokenizer padding": (
        _set("tokenizer", {"source": "union", "pad_to_multiple_of": 100}),
        "changes the embedding rows",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_fails_before_compute(case, sources, tmp_path, monkeypatch):
    mutate, message = CASES[case]
    recipe = evolve_recipe(sources)
    mutate(recipe, sources)

    def no_compute(*args, **kwargs):
        raise AssertionError("compute started before validation finished")

    monkeypatch.setattr(evolve_run, "load_and_setup", no_compute)
    with pytest.raises(DammergeError, match=message) as caught:
        evolve_merge(recipe, tmp_path / "out", progress=False)
    assert "\n" not in caught.value.message
    assert list(tmp_path.iterdir()) == []  # no output, no work folder


def test_bad_records_in_a_dataset(sources, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "w1", "output": "w2"}\n{"instruction": "w3"}\n')
    recipe = evolve_recipe(sources)
    recipe["models"][0]["dataset"] = {"path": str(bad)}
    with pytest.raises(DammergeError, match="record 2 has no text field 'output'"):
        evolve_merge(recipe, tmp_path / "out", progress=False)


def test_output_rules(sources, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(DammergeError, match="already exists"):
        evolve_merge(evolve_recipe(sources), tmp_path / "exists", progress=False)
    with pytest.raises(DammergeError, match="overlaps input model"):
        evolve_merge(evolve_recipe(sources), sources.a / "inside", progress=False)


def test_dry_run_describes_and_writes_nothing(sources, tmp_path, capsys):
    assert evolve_merge(evolve_recipe(sources), tmp_path / "out", dry_run=True) is None
    assert list(tmp_path.iterdir()) == []
    printed = capsys.readouterr().err
    assert "genes       4 (2 layer group(s)" in printed and "dry run: nothing written" in printed

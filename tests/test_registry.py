"""The registry: one table of methods, and whole recipes validated before any input is read."""

from __future__ import annotations

import pytest

from dammerge.errors import ConfigError
from dammerge.evolve.settings import EvolveSettings
from dammerge.learned.settings import TrainingSettings
from dammerge.methods import METHODS
from dammerge.registry import REGISTRY, get_entry, load_recipe

MISSING = "/nonexistent/model"  # never read: validation of the recipe comes first


def recipe(method: str, **extra) -> dict:
    return {"merge_method": method, "base_model": MISSING, "models": [{"model": MISSING}], **extra}


def test_every_catalogue_method_and_the_data_informed_ones_are_registered():
    assert set(METHODS) < set(REGISTRY)
    assert {REGISTRY[n].kind for n in ("dam", "adamerging", "evolve")} == {"learned", "search"}
    assert all(REGISTRY[n].kind == "data-free" for n in METHODS)
    assert all(e.paper.startswith("https://") for e in REGISTRY.values() if e.kind != "data-free")


def test_unknown_method_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown merge_method 'tie'") as info:
        get_entry("tie")
    assert "ties" in info.value.hint and "dam" in info.value.hint


@pytest.mark.parametrize(
    ("method", "training", "message"),
    [
        ("dam", {"lr": -1}, "training.lr"),
        (
            "dam",
            {"teachr": "precomputed"},
            "training: unknown key 'teachr' — did you mean 'teacher'",
        ),
        ("adamerging", {"preset": "nope"}, "unknown preset"),
        ("evolve", {"budjet": 10}, "training: unknown key 'budjet' — did you mean 'budget'"),
        ("ties", {"steps": 3}, "data-free method"),
    ],
)
def test_training_block_is_validated_when_the_recipe_is_loaded(method, training, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe(method, training=training))


def test_data_free_parameters_are_validated_when_the_recipe_is_loaded():
    with pytest.raises(ConfigError, match="unknown parameter 'lambada'"):
        load_recipe(recipe("ties", parameters={"lambada": 1.0}))


def test_loaded_recipe_carries_typed_settings_with_the_method_preset():
    dam = load_recipe(recipe("dam", training={"lr": 0.01}))
    assert isinstance(dam.settings, TrainingSettings)
    assert (dam.settings.granularity, dam.settings.objective, dam.settings.lr) == (
        "column",
        "kl",
        0.01,
    )
    ada = load_recipe(recipe("adamerging"))
    assert (ada.settings.granularity, ada.settings.objective) == ("layer", "entropy")
    evolve = load_recipe(recipe("evolve", training={"budget": 8}))
    assert isinstance(evolve.settings, EvolveSettings) and evolve.settings.budget == 8
    assert load_recipe(recipe("linear")).settings is None


def test_seeded_methods_are_the_stochastic_and_data_informed_ones():
    seeded = {name for name, entry in REGISTRY.items() if entry.seeded}
    stochastic = {name for name, method in METHODS.items() if method.stochastic}
    assert seeded == stochastic | {"dam", "adamerging", "evolve"}

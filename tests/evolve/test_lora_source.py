"""A ``base+adapter`` reference as a source of an evolutionary search: the search reads it
through the same planner, so it must run exactly as on peft's folded copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dammerge.config import MergeConfig
from dammerge.evolve import evolve_merge
from dammerge.testing import make_lora_adapter

from ..checkpoint.lora_reference import assert_identical, fold_with_peft, tensors
from .evolve_helpers import evolve_recipe

pytestmark = pytest.mark.slow


def test_a_lora_source_searches_as_its_folded_copy(sources, tmp_path):
    adapter = make_lora_adapter(sources.base, tmp_path / "adapter", r=4)
    folded = fold_with_peft(sources.base, adapter, tmp_path / "folded")
    outputs = []
    for label, model in (("lora", f"{sources.base}+{adapter}"), ("folded", str(folded))):
        recipe = evolve_recipe(sources, budget=8, popsize=8)
        recipe["models"][0]["model"] = model
        out = tmp_path / f"out-{label}"
        evolve_merge(recipe, out, progress=False)
        outputs.append(out)
    assert_identical(tensors(outputs[0]), tensors(outputs[1]))
    saved = MergeConfig.from_yaml(outputs[0] / "dammerge_config.yml")  # relative to the file
    saved_base, saved_adapter = saved.models[0].model.split("+")
    assert (Path(saved_base).resolve(), Path(saved_adapter).resolve()) == (
        Path(sources.base).resolve(),
        adapter.resolve(),
    )

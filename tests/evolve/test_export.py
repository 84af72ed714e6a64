"""The best genome exports as a plain recipe whose ordinary merge is the in-memory candidate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dammerge.config import MergeConfig
from dammerge.dispatch import merge
from dammerge.evolve import evolve_merge
from dammerge.evolve.candidate import InMemoryMerger
from dammerge.evolve.run import prepare
from dammerge.evolve.settings import read_settings

from .evolve_helpers import evolve_recipe, logits_mse_fitness


def _tensors(folder):
    return load_file(folder / "model.safetensors")


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


@pytest.mark.parametrize(
    ("method", "seed"),
    [("linear", 0), ("dare_ties", 7)],  # dare_ties: the seed must reach the same Bernoulli masks
)
def test_exported_recipe_reproduces_the_best_candidate(sources, tmp_path, method, seed):
    recipe = evolve_recipe(sources, budget=12, popsize=6, module_groups=["self_attn"])
    recipe["parameters"] = {"method": method}
    fitness = logits_mse_fitness(sources.target)
    out = tmp_path / "out"
    result = evolve_merge(recipe, out, fitness=fitness, seed=seed, progress=False)
    assert result is not None and result.output == out.resolve()

    evolved = MergeConfig.from_yaml(out / "evolved_recipe.yml")
    # the same recipe, its paths spelt from the file's folder
    assert evolved.map_paths(_resolved) == result.recipe.map_paths(_resolved)
    assert evolved.merge_method == method
    written = _tensors(out)

    # 1. the ordinary data-free merge of the exported recipe gives the same checkpoint
    again = merge(out / "evolved_recipe.yml", tmp_path / "again", seed=seed, progress=False)
    for name, tensor in _tensors(again).items():
        assert torch.equal(tensor, written[name]), name

    # 2. ... which is the in-memory candidate that scored best
    log = [json.loads(line) for line in (out / "evolve_log.jsonl").read_text().splitlines()]
    best = max((r for r in log[1:] if r["fitness"] is not None), key=lambda r: r["fitness"])
    cfg = MergeConfig.from_dict(recipe)
    prepared = prepare(
        cfg,
        tmp_path / "unused",
        settings=read_settings(cfg),
        fitness=fitness,
        seed=seed,
        overwrite=False,
    )
    merger = InMemoryMerger(prepared.plan, torch.device("cpu"), seed)
    in_memory = dict(merger.tensors(prepared.space.to_config(np.asarray(best["x"]))))
    assert in_memory.keys() == written.keys()
    for name, tensor in in_memory.items():
        assert torch.equal(tensor, written[name]), name

    # 3. and the checkpoint, loaded by transformers, has the logged best fitness
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert fitness(loaded) == pytest.approx(best["fitness"], rel=1e-5, abs=1e-9)
    assert result.best_fitness == best["fitness"]


def test_output_folder_contents_and_stats(sources, tmp_path):
    out = tmp_path / "out"
    result = evolve_merge(
        evolve_recipe(sources, budget=16, popsize=8, samples=4),  # default fitness: kl
        out,
        progress=False,
    )
    assert result is not None
    for name in (
        "evolved_recipe.yml",
        "evolve_recipe.yml",
        "evolve_log.jsonl",
        "evolve_stats.json",
        "dammerge_config.yml",
        "config.json",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "evolve_fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out.evolve-work").exists()
    stats = json.loads((out / "evolve_stats.json").read_text())
    assert stats["evaluations"] == stats["evaluations_this_run"] == 16
    assert stats["fitness"] == "kl" and stats["generations"] == 2 and stats["genes"] == 4
    # every evaluation forwards the 4 + 4 held-in sequences once
    assert stats["forward_sequences"] == 16 * 8 and stats["setup_forward_sequences"] == 8
    assert stats["forward_tokens"] == 16 * stats["setup_forward_tokens"]
    assert stats["forward_passes"] == 16 * 8 + 8 and stats["backward_passes"] == 0
    assert stats["fitness_evaluations"] == 16
    assert stats["peak_rss_mib"] > 0 and stats["wall_seconds"] > 0
    assert stats["best_fitness"] == result.best_fitness <= 0.0
    lines = (out / "evolve_log.jsonl").read_text().splitlines()
    assert len(lines) == 17 and json.loads(lines[0])["kind"] == "header"
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_saved_recipes_rebuild_the_checkpoint_from_another_folder(sources, tmp_path, monkeypatch):
    """The search runs with paths relative to its working folder, as a user writes them; its
    ``evolved_recipe.yml`` and ``dammerge_config.yml`` then rebuild the same checkpoint (every
    tensor equal) when merged from an unrelated working folder."""
    root = sources.base.parent
    recipe = evolve_recipe(sources, budget=4, popsize=2, layer_groups=1)
    recipe["base_model"] = sources.base.name
    for model, path, data in zip(
        recipe["models"], (sources.a, sources.b), (sources.data_a, sources.data_b), strict=True
    ):
        model["model"] = path.name
        model["dataset"]["path"] = data.name
    monkeypatch.chdir(root)
    out = tmp_path / "out"
    evolve_merge(recipe, out, fitness=logits_mse_fitness(sources.target), seed=3, progress=False)
    written = _tensors(out)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for saved in ("evolved_recipe.yml", "dammerge_config.yml"):
        assert "relative to the folder of this file" in (out / saved).read_text()
        again = merge(out / saved, tmp_path / f"again-{saved}", seed=3, progress=False)
        rebuilt = _tensors(again)
        assert rebuilt.keys() == written.keys()
        for name, tensor in rebuilt.items():
            assert torch.equal(tensor, written[name]), (saved, name)


def test_chat_template_and_tokenizer_reach_the_output(sources, tmp_path):
    from transformers import AutoTokenizer

    recipe = {
        **evolve_recipe(sources, budget=8, popsize=8),
        "tokenizer_source": "union",
        "chat_template": "chatml",
    }
    out = tmp_path / "out"
    evolve_merge(recipe, out, fitness=logits_mse_fitness(sources.target), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False)
    assert rendered == "<|im_start|>user\nw5<|im_end|>\n"
    written = MergeConfig.from_yaml(out / "evolved_recipe.yml")
    assert written.tokenizer_source == "union" and written.chat_template == "chatml"

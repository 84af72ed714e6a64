"""``base+adapter`` references: a PEFT LoRA adapter folded into its base as tensors are read.

The reference everything is checked against is peft itself: ``PeftModel.from_pretrained(base,
adapter).merge_and_unload()``, saved as an ordinary folder. Folding while reading must give
exactly its tensors, and merging ``base+adapter`` must give exactly what merging that folder
gives. Every bad adapter is refused by the dry run, before anything is computed or written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import dammerge
from dammerge.checkpoint.lora import LoraCheckpoint
from dammerge.config import MergeConfig, ModelReference
from dammerge.errors import CheckpointError, ConfigError, DammergeError
from dammerge.testing import make_lora_adapter, make_tiny_model

from .lora_reference import assert_identical, fold_with_peft, tensors


@pytest.fixture(scope="module")
def lora(llama_family, tmp_path_factory):
    """The tiny Llama base, an adapter on its attention and MLP, and peft's folded model."""
    base, _ = llama_family
    root = tmp_path_factory.mktemp("lora")
    adapter = make_lora_adapter(
        base, root / "adapter", target_modules=("q_proj", "v_proj", "down_proj"), r=4
    )
    return base, adapter, fold_with_peft(base, adapter, root / "folded")


ADAPTER_CASES = {
    "plain": ("llama", torch.float32, {"target_modules": ("q_proj", "o_proj"), "r": 4}),
    "rslora_patterns": (
        "llama",
        torch.float32,
        {
            "target_modules": ("q_proj", "up_proj"),
            "r": 4,
            "lora_alpha": 12,
            "use_rslora": True,
            "rank_pattern": {"layers.1.self_attn.q_proj": 2},
            "alpha_pattern": {"up_proj": 3},
        },
    ),
    "embedding_and_modules_to_save": (
        "llama",
        torch.float32,
        {"target_modules": ("embed_tokens", "k_proj"), "r": 2, "modules_to_save": ["lm_head"]},
    ),
    "bfloat16_base_with_trained_biases": (
        "qwen2",
        torch.bfloat16,
        {"target_modules": ("q_proj", "gate_proj"), "r": 2, "bias": "all"},
    ),
    "fan_in_fan_out_conv1d": ("gpt2", torch.float32, {"target_modules": ("c_attn",), "r": 2}),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_folding_while_reading_equals_peft_merge_and_unload(case, tmp_path):
    model_type, dtype, config = ADAPTER_CASES[case]
    base = make_tiny_model(tmp_path / "base", model_type, dtype=dtype)
    adapter = make_lora_adapter(base, tmp_path / "adapter", **config)
    expected = tensors(fold_with_peft(base, adapter, tmp_path / "folded"))
    checkpoint = LoraCheckpoint(base, adapter)
    assert_identical({name: checkpoint.get(name) for name in checkpoint.names()}, expected)
    original = tensors(base)
    assert any(not torch.equal(original[n], expected[n]) for n in expected), "adapter was a no-op"


MERGES = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "ADAPTED", "parameters": {"weight": 0.6}},
            {"model": "FT0", "parameters": {"weight": 0.4}},
        ],
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "BASE",
        "models": [
            {"model": "ADAPTED", "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": "FT0", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    },
    "union_tokenizer_and_chat_template_from_an_adapted_reference": {
        "merge_method": "linear",
        "models": [
            {"model": "ADAPTED", "parameters": {"weight": 0.5}},
            {"model": "FT0", "parameters": {"weight": 0.5}},
        ],
        "tokenizer_source": "union",
        "chat_template": "auto",
    },
    "task_arithmetic_on_an_adapted_base": {
        "merge_method": "task_arithmetic",
        "base_model": "ADAPTED",
        "models": [{"model": "FT0", "parameters": {"weight": 0.8}}],
    },
}


def filled(recipe: dict, paths: dict[str, str]) -> dict:
    text = yaml.safe_dump(recipe)
    for key, value in paths.items():
        text = text.replace(key, value)
    return yaml.safe_load(text)


@pytest.mark.parametrize("name", list(MERGES))
def test_lora_applied_then_merged_equals_merging_the_folded_checkpoint(
    name, lora, llama_family, tmp_path
):
    base, adapter, folded = lora
    ft0 = llama_family[1][0]
    paths = {"BASE": str(base), "FT0": str(ft0)}
    with_reference = filled(MERGES[name], {"ADAPTED": f"{base}+{adapter}", **paths})
    with_folder = filled(MERGES[name], {"ADAPTED": str(folded), **paths})
    ours = dammerge.merge(with_reference, tmp_path / "lora", progress=False)
    theirs = dammerge.merge(with_folder, tmp_path / "folded", progress=False)
    assert ours is not None and theirs is not None
    assert_identical(tensors(ours), tensors(theirs))
    for side_file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (ours / side_file).read_text() == (theirs / side_file).read_text()


def test_the_output_loads_in_transformers_and_computes_what_peft_computes(lora, tmp_path):
    base, adapter, folded = lora
    recipe = {"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]}
    out = dammerge.merge(recipe, tmp_path / "out", progress=False)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(folded)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [f"{base.name}+{adapter.name}"]
    saved = MergeConfig.from_yaml(out / "dammerge_config.yml")  # paths relative to `out`
    assert saved.models[0].model.count("+") == 1
    saved_base, saved_adapter = saved.models[0].model.split("+")
    assert (Path(saved_base).resolve(), Path(saved_adapter).resolve()) == (
        base.resolve(),
        adapter.resolve(),
    )


def test_a_recipe_file_resolves_both_halves_from_its_folder(lora, tmp_path):
    base, adapter, folded = lora
    for name, source in (("base", base), ("adapter", adapter)):
        shutil.copytree(source, tmp_path / name)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: passthrough\nmodels:\n  - model: base+adapter\n")
    config = MergeConfig.from_yaml(recipe)
    assert config.models[0].model == f"{tmp_path / 'base'}+{tmp_path / 'adapter'}"
    out = dammerge.merge(recipe, tmp_path / "out", progress=False)
    assert_identical(tensors(out), tensors(folded))


def test_a_folder_whose_name_has_a_plus_is_a_folder(tmp_path):
    folder = tmp_path / "odd+name"
    folder.mkdir()
    assert ModelReference.parse(str(folder)) == ModelReference(str(folder))
    assert ModelReference.parse("a+b") == ModelReference("a", "b")
    with pytest.raises(ConfigError, match="cannot read model reference"):
        ModelReference.parse("a+b+c")


def test_the_same_base_with_two_adapters_is_two_models(lora, llama_family, tmp_path):
    """Inputs are keyed by base and adapter together, not by the base folder alone."""
    base, adapter, folded = lora
    other = make_lora_adapter(base, tmp_path / "other", seed=7, r=4)
    other_folded = fold_with_peft(base, other, tmp_path / "other_folded")
    models = [(f"{base}+{adapter}", f"{base}+{other}"), (str(folded), str(other_folded))]
    outs = []
    for index, (first, second) in enumerate(models):
        recipe = {
            "merge_method": "linear",
            "models": [
                {"model": first, "parameters": {"weight": 0.5}},
                {"model": second, "parameters": {"weight": 0.5}},
            ],
        }
        outs.append(dammerge.merge(recipe, tmp_path / f"out{index}", progress=False))
    assert_identical(tensors(outs[0]), tensors(outs[1]))


# -- refused before compute -----------------------------------------------------------------


def refused(reference: str, tmp_path: Path, **options) -> DammergeError:
    """The error a dry run of a one-model recipe over ``reference`` raises."""
    recipe = {"merge_method": "passthrough", "models": [{"model": reference}]}
    with pytest.raises(DammergeError) as caught:
        dammerge.merge(recipe, tmp_path / "out", dry_run=True, progress=False, **options)
    assert not (tmp_path / "out").exists()
    assert "\n" not in caught.value.message and caught.value.hint
    return caught.value


def edited_copy(adapter: Path, folder: Path, **config_changes) -> Path:
    shutil.copytree(adapter, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return folder


def test_a_missing_adapter_or_base_folder_is_named(lora, tmp_path):
    base, adapter, _ = lora
    error = refused(f"{base}+{tmp_path}/nowhere", tmp_path)
    assert "LoRA adapter folder not found" in error.message
    error = refused(f"{tmp_path}/nobase+{adapter}", tmp_path)
    assert "model folder not found" in error.message


def test_a_folder_without_adapter_config_is_refused(lora, tmp_path):
    base, adapter, _ = lora
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no adapter_config.json" in refused(f"{base}+{empty}", tmp_path).message
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text("{not json")
    assert "is not valid JSON" in refused(f"{base}+{broken}", tmp_path).message


def test_a_non_lora_adapter_is_refused(llama_family, tmp_path):
    from peft import IA3Config, get_peft_model

    base, _ = llama_family
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(tmp_path / "ia3")
    error = refused(f"{base}+{tmp_path / 'ia3'}", tmp_path)
    assert "is a IA3 adapter" in error.message and "only LoRA" in error.message


def test_a_dora_adapter_is_refused(llama_family, tmp_path):
    base, _ = llama_family
    dora = make_lora_adapter(base, tmp_path / "dora", r=2, use_dora=True)
    error = refused(f"{base}+{dora}", tmp_path)
    assert "use_dora" in error.message


def test_an_adapter_of_another_model_does_not_fit(llama_family, tmp_path):
    base, _ = llama_family
    wider = make_tiny_model(tmp_path / "wider", "llama", hidden_size=48)
    deeper = make_tiny_model(tmp_path / "deeper", "llama", num_hidden_layers=4)
    error = refused(f"{base}+{make_lora_adapter(wider, tmp_path / 'w', r=2)}", tmp_path)
    assert "does not fit base" in error.message
    assert (
        "model.layers.0.self_attn.q_proj.weight: base [32, 32] vs adapter [48, 48]" in error.message
    )
    error = refused(f"{base}+{make_lora_adapter(deeper, tmp_path / 'd', r=2)}", tmp_path)
    assert "the base lacks model.layers.3.self_attn.q_proj.weight" in error.message


def test_a_rank_that_disagrees_with_the_config_is_refused(lora, tmp_path):
    base, adapter, _ = lora
    edited = edited_copy(adapter, tmp_path / "edited", r=8)
    assert (
        "has rank 4 but its adapter_config.json says r=8"
        in refused(f"{base}+{edited}", tmp_path).message
    )
    wrong_type = edited_copy(adapter, tmp_path / "typed", lora_alpha="eight")
    assert (
        "'lora_alpha' must be a positive number"
        in refused(f"{base}+{wrong_type}", tmp_path).message
    )


def test_a_pickled_adapter_needs_allow_pickle(lora, tmp_path):
    base, _, folded = lora
    pickled = make_lora_adapter(
        base,
        tmp_path / "pickled",
        target_modules=("q_proj", "v_proj", "down_proj"),
        r=4,
        safe_serialization=False,
    )
    assert (pickled / "adapter_model.bin").is_file()
    error = refused(f"{base}+{pickled}", tmp_path)
    assert "pickle" in error.message and "--allow-pickle" in (error.hint or "")
    recipe = {"merge_method": "passthrough", "models": [{"model": f"{base}+{pickled}"}]}
    out = dammerge.merge(recipe, tmp_path / "ok", allow_pickle=True, progress=False)
    assert_identical(tensors(out), tensors(folded))  # same seed: the same adapter


def test_learned_methods_refuse_lora_references(lora, llama_family, tmp_path):
    base, adapter, _ = lora
    recipe = {
        "merge_method": "dam",
        "base_model": str(base),
        "models": [{"model": f"{base}+{adapter}"}, {"model": str(llama_family[1][0])}],
    }
    with pytest.raises(ConfigError, match=r"does not take LoRA references"):
        dammerge.merge(recipe, tmp_path / "out", dry_run=True, progress=False)


def test_an_unreadable_adapter_file_is_refused(lora, tmp_path):
    base, adapter, _ = lora
    truncated = tmp_path / "truncated"
    shutil.copytree(adapter, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LoraCheckpoint(base, truncated)


def test_a_setting_peft_does_not_know_is_refused_unless_unset(lora, tmp_path):
    """A newer peft's setting could change what merging means; unset (null, false) it cannot."""
    base, adapter, folded = lora
    newer = edited_copy(adapter, tmp_path / "newer", some_future_variant=True)
    assert (
        "sets 'some_future_variant', which this peft version does not know"
        in refused(f"{base}+{newer}", tmp_path).message
    )
    unset = edited_copy(adapter, tmp_path / "unset", some_future_variant=None)
    recipe = {"merge_method": "passthrough", "models": [{"model": f"{base}+{unset}"}]}
    out = dammerge.merge(recipe, tmp_path / "ok", progress=False)
    assert_identical(tensors(out), tensors(folded))

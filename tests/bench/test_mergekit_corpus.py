"""The recipe corpus script: which YAML it takes from a mergekit checkout, and how it rewrites a
recipe's model references (and nothing else) to tiny local models."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "mergekit_corpus.py"
_spec = importlib.util.spec_from_file_location("mergekit_corpus", _PATH)
corpus = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = corpus  # its dataclasses look their module up while defined
_spec.loader.exec_module(corpus)

SLERP = {
    "slices": [
        {
            "sources": [
                {"model": "psmathur/orca_mini_v3_13b", "layer_range": [0, 40]},
                {"model": "garage-bAInd/Platypus2-13B", "layer_range": [0, 40]},
            ]
        }
    ],
    "merge_method": "slerp",
    "base_model": "psmathur/orca_mini_v3_13b",
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
    "dtype": "float16",
}


def test_every_model_reference_is_found_once_in_order():
    recipe = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [{"model": "org/a"}, {"model": "org/base"}, {"model": "org/b+org/lora"}],
        "tokenizer_source": "org/c",
    }
    assert corpus.model_references(recipe) == ["org/base", "org/a", "org/b+org/lora", "org/c"]
    assert corpus.model_references({**recipe, "tokenizer_source": "union"})[-1] != "union"
    assert corpus.model_references(SLERP) == [
        "psmathur/orca_mini_v3_13b",
        "garage-bAInd/Platypus2-13B",
    ]


def test_the_base_is_the_tiny_base_and_each_other_model_its_own_variant():
    recipe = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [{"model": "org/a"}, {"model": "org/b"}, {"model": "org/a+org/lora"}],
    }
    roles = corpus.assign_roles(recipe)
    assert roles["org/base"] == corpus.ModelRole(None)
    assert roles["org/a"] == corpus.ModelRole(0)
    assert roles["org/b"] == corpus.ModelRole(1)
    assert roles["org/a+org/lora"] == corpus.ModelRole(0, adapter=0)  # org/a, adapted


def test_only_model_references_change(tmp_path):
    mapping = {"psmathur/orca_mini_v3_13b": "/m/base", "garage-bAInd/Platypus2-13B": "/m/ft0"}
    before = copy.deepcopy(SLERP)
    rewritten = corpus.rewrite(SLERP, mapping)
    assert before == SLERP  # the input is not modified
    assert rewritten["base_model"] == "/m/base"
    assert [s["model"] for s in rewritten["slices"][0]["sources"]] == ["/m/base", "/m/ft0"]
    unchanged = {k: v for k, v in rewritten.items() if k not in ("base_model", "slices")}
    assert unchanged == {k: v for k, v in SLERP.items() if k not in ("base_model", "slices")}
    assert rewritten["slices"][0]["sources"][1]["layer_range"] == [0, 40]


def test_tiny_models_take_the_family_and_depth_the_recipe_needs():
    assert corpus.family_of("mistralai/Mistral-7B-Instruct-v0.2") == "mistral"
    assert corpus.family_of("BioMistral/BioMistral-7B") == "mistral"
    assert corpus.family_of("Qwen/Qwen2.5-7B") == "qwen2"
    assert corpus.family_of("TheBloke/Llama-2-13B-fp16") == "llama"
    assert corpus.family_of("model_a") == "llama"
    assert corpus.recipe_depth(SLERP) == 40
    assert corpus.recipe_depth({"merge_method": "linear", "models": []}) == corpus.DEFAULT_DEPTH


def test_recipes_are_whole_single_documents_with_a_merge_method():
    assert corpus.as_recipe("a.yml", "merge_method: linear\nmodels: []\n").recipe is not None
    assert (
        "mergekit-multi"
        in corpus.as_recipe("b.yml", "merge_method: a\n---\nmerge_method: b\n").skipped
    )
    assert "no merge_method" in corpus.as_recipe("c.yml", "tokenizer: {source: union}\n").skipped
    assert "not valid YAML" in corpus.as_recipe("d.yml", "models:\n  - a\n  b: [\n").skipped
    text = "intro\n```yaml\nmerge_method: linear\n```\ntext\n```yml\nx: 1\n```\n```python\ny\n```\n"
    assert corpus.markdown_blocks(text) == ["merge_method: linear\n", "x: 1\n"]


def test_the_corpus_is_read_from_a_bare_mirror_or_a_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "examples").mkdir(parents=True)
    (checkout / "docs").mkdir()
    (checkout / "examples" / "linear.yml").write_text("merge_method: linear\nmodels: []\n")
    (checkout / "docs" / "page.md").write_text("```yaml\nmerge_method: slerp\n```\n")
    (checkout / "src.py").write_text("x = 1\n")
    git = ["git", "-C", str(checkout)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, *identity, "commit", "-qm", "corpus"], check=True)
    mirror = tmp_path / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(checkout), str(mirror)], check=True)
    for path in (checkout, mirror):
        entries = corpus.collect_corpus(corpus.MergekitSource(path))
        found = {e.source: e.recipe["merge_method"] for e in entries if e.recipe}
        assert found == {"examples/linear.yml": "linear", "docs/page.md#yaml-1": "slerp"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ulp_distance_counts_representable_values_between(dtype):
    one = torch.tensor([1.0], dtype=dtype)
    above = torch.nextafter(one, torch.tensor([2.0], dtype=dtype))
    two_above = torch.nextafter(above, torch.tensor([2.0], dtype=dtype))
    zero, negative_zero = torch.zeros(1, dtype=dtype), -torch.zeros(1, dtype=dtype)
    assert int(corpus.ulp_distance(one, one)) == 0
    assert int(corpus.ulp_distance(one, above)) == 1
    assert int(corpus.ulp_distance(two_above, one)) == 2
    assert int(corpus.ulp_distance(zero, negative_zero)) == 0
    tiny = torch.nextafter(zero, torch.ones(1, dtype=dtype))
    assert int(corpus.ulp_distance(tiny, -tiny)) == 2  # across zero


def test_compare_reports_names_shapes_dtypes_and_ulps(tmp_path):
    from safetensors.torch import save_file

    x = torch.tensor([1.0, 2.0, -3.0], dtype=torch.bfloat16)
    step = torch.nextafter(x, torch.full_like(x, 10.0))
    ours = {name: x.clone() for name in ("same", "near", "far", "wider", "only_ours")}
    theirs = {
        "same": x.clone(),
        "near": step,
        "far": torch.nextafter(step, torch.full_like(x, 10.0)),
        "wider": x.float(),  # mergekit wrote float32: compared after rounding to ours
        "only_theirs": x.clone(),
    }
    for name, state in (("ours", ours), ("theirs", theirs)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    result = corpus.compare(tmp_path / "ours", tmp_path / "theirs")
    assert result["only_dammerge"] == ["only_ours"] and result["only_mergekit"] == ["only_theirs"]
    assert result["dtype_differs"] == ["wider: torch.bfloat16 vs torch.float32"]
    assert result["max_ulp"] == {"bfloat16": 2}
    assert result["entries_over_one_ulp"] == {"bfloat16": 3} and result["entries"] == {
        "bfloat16": 12
    }
    assert not result["same_tensors"] and not result["within_one_ulp"]
    rounded = corpus.compare(tmp_path / "ours", tmp_path / "ours", round_to=torch.float16)
    assert rounded["dtype_differs"] and rounded["max_ulp"] == {"bfloat16": 0}


def _ambiguous_by_brute_force(score: list[float], k: int) -> set[int]:
    """Entries that some top-k choice keeps and another drops (every k-subset whose scores are
    all at least every other entry's is a valid choice)."""
    from itertools import combinations

    valid = [
        set(chosen)
        for chosen in combinations(range(len(score)), k)
        if min(score[i] for i in chosen)
        >= max((score[j] for j in range(len(score)) if j not in chosen), default=-1.0)
    ]
    return set.union(*valid) - set.intersection(*valid)


@pytest.mark.parametrize("density", [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
def test_ties_at_the_cut_are_the_entries_a_top_k_choice_may_keep_or_drop(density):
    from types import SimpleNamespace

    base = SimpleNamespace(model="base", tensor="w")
    other = SimpleNamespace(model="a", tensor="w")
    delta = torch.tensor([3.0, -5.0, 3.0, 1.0, -3.0, 4.0])
    tensor = SimpleNamespace(
        params={}, model_params=[{"density": density}], sources=[other], base_source=base
    )
    tied = corpus.tied_at_cut("ties", tensor, [delta])
    k = max(1, int(density * delta.numel()))
    expected = _ambiguous_by_brute_force(delta.abs().tolist(), k)
    assert set(torch.nonzero(tied).flatten().tolist()) == expected


def test_the_harvester_records_each_configuration_a_test_builds(tmp_path):
    """A stand-in test module: fixtures resolved by name (and built once), a test that builds
    two configurations gets [1] and [2], a ``pytest.raises`` block that does not raise marks
    the configuration as expected to fail."""
    import types

    path = Path(__file__).resolve().parents[2] / "bench" / "mergekit_harvest.py"
    spec = importlib.util.spec_from_file_location("mergekit_harvest", path)
    harvest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harvest)

    class Config:
        def __init__(self, method: str, model: str) -> None:
            self.data = {"merge_method": method, "models": [{"model": model}]}

        def model_dump(self, **_options):
            return self.data

    built = []
    module = types.ModuleType("tests.test_fake")

    def model_a(tmp_path_factory):
        built.append("model_a")
        return str(tmp_path_factory.mktemp("model_a"))

    class TestFake:
        def test_two(self, model_a):
            module.run_and_check_merge(Config("linear", model_a))
            module.run_and_check_merge(Config("slerp", model_a))

        def test_failing(self, model_a):
            with harvest._raises(ValueError):
                module.run_and_check_merge(Config("della", model_a))

    module.model_a = harvest.Fixture(model_a)
    module.TestFake = TestFake
    module.run_and_check_merge = None
    entries = harvest.harvest_module("tests/test_fake.py", module, tmp_path)
    assert [e["source"] for e in entries] == [
        "tests/test_fake.py::TestFake::test_two[1]",
        "tests/test_fake.py::TestFake::test_two[2]",
        "tests/test_fake.py::TestFake::test_failing",
    ]
    assert [e["config"]["merge_method"] for e in entries] == ["linear", "slerp", "della"]
    assert [e["expects_failure"] for e in entries] == [False, False, True]
    assert built == ["model_a"]  # session scope: built once
    assert entries[0]["config"]["models"][0]["model"].startswith(str(tmp_path))


def test_only_selects_entries_whose_source_contains_any_text():
    config = "tests/test_basic_merges.py::TestBasicMerges::test_nuslerp_VLM_merges[3]"
    assert corpus.selected(config, None) and corpus.selected(config, [])
    assert corpus.selected(config, ["test_nuslerp_VLM_merges[3]"])
    assert not corpus.selected(config, ["test_nuslerp_VLM_merges[7]"])
    assert corpus.selected(config, ["test_ties_VLM_merge", "VLM_merges[3]"])
    assert not corpus.selected("examples/ties.yml", ["VLM"])


def _results(runs: list[tuple[str, str, bool]], **top) -> dict:
    """Results of the given (source, dtype, within one ulp) runs, both tools ran."""
    records = [
        {
            "source": source,
            "dtype": dtype,
            "merge_method": "ties",
            "deterministic": True,
            "mergekit": {"ran": True, "error": None},
            "dammerge": {"ran": True, "refusal": None},
            "comparison": {"within_one_ulp": within},
        }
        for source, dtype, within in runs
    ]
    return {
        "timestamp": "t0",
        "dammerge_commit": "c0",
        "mergekit_revision": "r",
        "mergekit_version": "0.1.5",
        "recipes": records,
        **top,
    }


def test_a_rerun_replaces_its_runs_and_keeps_the_others(tmp_path):
    a, b = "tests/t.py::T::test_a", "tests/t.py::T::test_b"
    previous = _results(
        [(a, "float32", True), (a, "float16", False), (b, "float16", False), ("x.yml", "", True)],
        skipped=[{"source": "y.yml", "reason": "fragment"}],
    )
    rerun = _results(
        [(a, "float16", True), (b, "float16", True), ("tests/t.py::T::test_c", "float32", True)],
        timestamp="t1",
        dammerge_commit="c1",
    )
    merged = corpus.merge_rerun(previous, rerun, ["t.py"], tmp_path)
    got = [(r["source"], r["dtype"], r["comparison"]["within_one_ulp"]) for r in merged["recipes"]]
    assert got == [
        (a, "float32", True),
        (a, "float16", True),  # replaced in place
        (b, "float16", True),
        ("x.yml", "", True),
        ("tests/t.py::T::test_c", "float32", True),  # new: appended
    ]
    assert merged["summary_test_configs"]["recipes"] == 4
    assert merged["summary_test_configs"]["within_one_ulp"] == 4
    assert merged["summary"]["recipes"] == 1
    assert merged["skipped"] == previous["skipped"]
    assert (merged["timestamp"], merged["dammerge_commit"]) == ("t0", "c0")  # the full run's
    assert merged["updates"] == [
        {
            "timestamp": "t1",
            "dammerge_commit": "c1",
            "only": ["t.py"],
            "runs": [f"{a} (float16)", f"{b} (float16)", "tests/t.py::T::test_c (float32)"],
        }
    ]
    assert previous["recipes"][1]["comparison"]["within_one_ulp"] is False  # not modified
    again = corpus.merge_rerun(merged, rerun, ["t.py"], tmp_path)
    assert len(again["recipes"]) == 5 and len(again["updates"]) == 2


def test_a_rerun_of_another_mergekit_is_not_mixed_in(tmp_path):
    previous = _results([("a.yml", "float16", True)])
    rerun = _results([("a.yml", "float16", True)], mergekit_revision="other")
    with pytest.raises(SystemExit, match="mergekit_revision"):
        corpus.merge_rerun(previous, rerun, ["a.yml"], tmp_path)


def test_loaded_names_are_the_names_transformers_loads_each_stored_tensor_under(tmp_path):
    """A LLaVA checkpoint as transformers 5 saves it (``vision_tower.``, ``language_model.``)
    loads under other names (``model.vision_tower.``, ...): each stored tensor is found, with
    its stored value, under the name the map gives."""
    from dammerge.testing import make_tiny_llava

    make_tiny_llava(tmp_path)
    stored, loaded = corpus.load_tensors(tmp_path), corpus.loaded_tensors(tmp_path)
    names = corpus.loaded_names(tmp_path)
    assert sorted(names) == sorted(stored)
    assert any(name != names[name] for name in names)  # the layouts differ
    assert names["vision_tower.embeddings.patch_embedding.weight"] == (
        "model.vision_tower.embeddings.patch_embedding.weight"
    )
    for name, tensor in stored.items():
        torch.testing.assert_close(loaded[names[name]], tensor, rtol=0, atol=0)

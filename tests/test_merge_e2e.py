"""End to end: recipe -> merged checkpoint that transformers loads, for every supported
architecture and every method; plus the executor's contracts (dry run, devices, seeds)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dammerge
from dammerge import executor
from dammerge.cli import main
from dammerge.config import MergeConfig
from dammerge.errors import DammergeError
from dammerge.executor import execute
from dammerge.plan import build_plan
from dammerge.testing import VOCAB, make_tiny_model, make_variant

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
)
# methods that take only global parameters: (models merged, parameters); the base is given
SPHERE_AND_SELECTIVE = {
    "karcher": (2, {"max_iter": 5}),
    "nearswap": (1, {"t": 0.01}),
    "arcee_fusion": (1, {}),
    "ram": (2, {"epsilon": 0.01}),
    "ramplus_tl": (2, {"epsilon": 0.01, "r": 0.5, "alpha": 1.0}),
}


def recipe_for(method: str, base: Path, variants: list[Path]) -> dict:
    """A typical recipe of each method, exercising scalars, gradients and filters."""
    models = [str(v) for v in variants]
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": models[0]}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                    {"filter": "mlp", "value": [1.0, 0.5, 0.0]},
                    {"value": 0.5},
                ]
            },
        }
    if method in SPHERE_AND_SELECTIVE:
        count, params = SPHERE_AND_SELECTIVE[method]
        return {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": m} for m in models[:count]],
            "parameters": params,
        }
    if method in ("nuslerp", "multislerp"):
        return {
            "merge_method": method,
            "base_model": str(base),
            "models": [
                {"model": models[0], "parameters": {"weight": [0.3, 0.7]}},
                {"model": models[1], "parameters": {"weight": 0.5}},
            ],
            "parameters": {"nuslerp_flatten": False} if method == "nuslerp" else {},
        }
    if method == "model_stock":
        return {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": m} for m in models],
        }
    per_model = {
        "linear": {"weight": 1.0},
        "task_arithmetic": {"weight": 0.7},
        "ties": {"weight": 1.0, "density": [0.3, 0.7]},
        "dare_linear": {"weight": 0.5, "density": 0.5},
        "dare_ties": {"weight": 0.5, "density": 0.5},
        "breadcrumbs": {"weight": 0.5, "density": 0.6, "gamma": 0.05},
        "breadcrumbs_ties": {"weight": 0.5, "density": 0.6, "gamma": 0.05},
        "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
        "della_linear": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    }[method]
    recipe = {
        "merge_method": method,
        "models": [{"model": m, "parameters": per_model} for m in models],
    }
    if method != "linear":
        recipe["base_model"] = str(base)
    return recipe


def assert_loads_and_runs(out: Path, reference: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9, 11]])).logits
    assert logits.shape == (1, 5, VOCAB)
    assert torch.isfinite(logits).all()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("w1 w2 w3")["input_ids"]
        == AutoTokenizer.from_pretrained(reference)("w1 w2 w3")["input_ids"]
    )
    written = set()
    for file in out.glob("*.safetensors"):
        written |= set(load_file(file))
    stored = set()
    for file in reference.glob("*.safetensors"):
        stored |= set(load_file(file))
    assert written == stored


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_on_every_architecture(arch, tiny_family, tmp_path):
    base, variants = tiny_family(arch)
    for method in METHODS:
        out = dammerge.merge(
            recipe_for(method, base, variants), tmp_path / method, progress=False, seed=3
        )
        assert_loads_and_runs(out, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_task_arithmetic_tensors_match_numpy(arch, tiny_family, tmp_path):
    """The executor wiring per architecture (names, transposed Conv1D, dtypes): every written
    tensor equals B + Σ wᵢ(Wᵢ − B) computed here in numpy."""
    base, variants = tiny_family(arch)
    out = dammerge.merge(
        recipe_for("task_arithmetic", base, variants), tmp_path / "m", progress=False
    )
    sources = [load_file(base / "model.safetensors")] + [
        load_file(v / "model.safetensors") for v in variants
    ]
    merged = load_file(out / "model.safetensors")
    for name, b in sources[0].items():
        expected = b.double().numpy() + sum(
            0.7 * (s[name].double().numpy() - b.double().numpy()) for s in sources[1:]
        )
        np.testing.assert_allclose(merged[name].double().numpy(), expected, atol=1e-6)


def test_linear_merge_equals_average_and_loads(llama_family, tmp_path):
    _base, variants = llama_family
    out = dammerge.merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(v), "parameters": {"weight": 1.0}} for v in variants],
        },
        tmp_path / "merged",
        progress=False,
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    sources = [AutoModelForCausalLM.from_pretrained(v) for v in variants]
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = sum(dict(s.named_parameters())[name] for s in sources) / 3
    torch.testing.assert_close(dict(merged.named_parameters())[name], expected)
    logits = merged(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "merge_method: linear" in (out / "README.md").read_text()


def test_yaml_path_api_and_tied_embeddings(tmp_path):
    base = make_tiny_model(tmp_path / "base", "llama", tie_word_embeddings=True)
    make_variant(base, tmp_path / "ft", seed=5)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": "base",  # relative to the recipe's folder
                "models": [{"model": "ft", "parameters": {"weight": 1.0, "density": 0.5}}],
            }
        )
    )
    out = dammerge.merge(recipe, tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_loads_and_runs(out, base)


def test_bf16_inputs_float32_output(tmp_path):
    base = make_tiny_model(tmp_path / "base", "qwen2", dtype=torch.bfloat16)
    variant = make_variant(base, tmp_path / "ft", seed=1)
    out = dammerge.merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(variant), "parameters": {"weight": 0.5}}],
            "out_dtype": "float32",
        },
        tmp_path / "m",
        progress=False,
    )
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert_loads_and_runs(out, base)


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_stochastic_merges_are_reproducible_per_seed(llama_family, tmp_path):
    base, variants = llama_family
    recipe = recipe_for("dare_ties", base, variants)
    a = dammerge.merge(recipe, tmp_path / "a", progress=False, seed=11)
    b = dammerge.merge(recipe, tmp_path / "b", progress=False, seed=11)
    c = dammerge.merge(recipe, tmp_path / "c", progress=False, seed=12)
    assert _digest(a) == _digest(b) != _digest(c)


def test_each_tensor_draws_the_same_whatever_the_order(llama_family):
    base, variants = llama_family
    plan = build_plan(MergeConfig.from_dict(recipe_for("della", base, variants)))
    device = torch.device("cpu")
    forward = {t.name: executor.merge_tensor(plan, t, device, 5) for t in plan.tensors}
    for t in reversed(plan.tensors):
        torch.testing.assert_close(
            executor.merge_tensor(plan, t, device, 5), forward[t.name], rtol=0, atol=0
        )


def test_nan_in_an_input_is_reported_and_nothing_written(llama_family, tmp_path, derive):
    base, (a, *_) = llama_family

    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        return state

    bad = derive(a, tmp_path / "bad", poison)
    with pytest.raises(DammergeError, match=r"NaN/Inf in model.layers.1.mlp.up_proj.weight.*bad"):
        dammerge.merge(recipe_for("task_arithmetic", base, [bad]), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def run_cli(monkeypatch, capfd, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["dammerge", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def test_dry_run_validates_prints_the_plan_and_writes_nothing(
    llama_family, tmp_path, monkeypatch, capfd
):
    base, variants = llama_family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(recipe_for("ties", base, variants)))
    out = tmp_path / "merged"
    code, _, err = run_cli(monkeypatch, capfd, "merge", recipe, out, "--dry-run")
    assert code == 0
    assert "method      ties" in err and "nothing written" in err
    assert "density" in err and "layers      3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]


def test_dry_run_still_catches_bad_input(llama_family, tmp_path, monkeypatch, capfd):
    base, variants = llama_family
    recipe = tmp_path / "recipe.yml"
    bad = recipe_for("ties", base, variants)
    bad["parameters"] = {"lambada": 1}
    recipe.write_text(yaml.safe_dump(bad))
    code, _, err = run_cli(monkeypatch, capfd, "merge", recipe, tmp_path / "o", "--dry-run")
    assert code == 2 and "unknown parameter 'lambada'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(llama_family, tmp_path, monkeypatch, capfd):
    base, variants = llama_family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(recipe_for("ties", base, variants)))
    code, _, err = run_cli(monkeypatch, capfd, "merge", recipe, tmp_path / "o", "--device", "cuda")
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: --device cuda was asked for but no CUDA GPU is visible"
    ]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]
    with pytest.raises(DammergeError, match="no CUDA GPU"):
        dammerge.merge(recipe, tmp_path / "o", device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "slerp", "model_stock"])
def test_cuda_merge_matches_cpu(llama_family, tmp_path, method):
    base, variants = llama_family
    recipe = recipe_for(method, base, variants)
    cpu = dammerge.merge(recipe, tmp_path / "cpu", progress=False, seed=4)
    gpu = dammerge.merge(recipe, tmp_path / "gpu", device="cuda", progress=False, seed=4)
    a, b = load_file(cpu / "model.safetensors"), load_file(gpu / "model.safetensors")
    for name in a:
        if method in ("dare_ties", "della"):  # CUDA draws its own random numbers
            assert a[name].shape == b[name].shape and torch.isfinite(b[name]).all()
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert_loads_and_runs(gpu, base)


@pytest.mark.parametrize("read_ahead", [1, 3])
def test_reading_ahead_gives_the_same_checkpoint(llama_family, tmp_path, read_ahead):
    """The GPU's read-ahead (inputs of the next tensors read while one is merged) changes
    nothing in the output, shards and stochastic methods included."""
    base, variants = llama_family
    plan = build_plan(MergeConfig.from_dict(recipe_for("dare_ties", base, variants)))
    shard = 20_000  # several shards, so reads run ahead across a flush
    plain = execute(plan, tmp_path / "plain", shard_size=shard, seed=3, progress=False)
    ahead = execute(
        plan, tmp_path / "ahead", shard_size=shard, seed=3, progress=False, read_ahead=read_ahead
    )
    files = sorted(p.name for p in plain.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in ahead.glob("*.safetensors"))
    for name in files:
        a, b = load_file(plain / name), load_file(ahead / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)

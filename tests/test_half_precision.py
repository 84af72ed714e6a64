"""What ``dtype``, ``compute_dtype`` and ``out_dtype`` mean for a data-free merge.

``dtype: float16`` / ``bfloat16`` rounds the inputs as they are read; the arithmetic runs in
float32 and the result is rounded once to the output dtype. Linear and SLERP results are checked
here against references computed in float64 from the same rounded inputs: each entry must be the
correctly rounded value or its neighbour (the float32 intermediate can round the other way only
when the exact value lies within float32 error of a half-way point, or where the terms cancel).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dammerge
from dammerge.config import MergeConfig
from dammerge.errors import ConfigError
from dammerge.plan import build_plan, describe
from dammerge.registry import load_recipe

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS = (0.3, 0.45, 0.6)
# fraction of entries allowed one ulp off (see the docstring); rounding every step in the half
# dtype leaves about a third of the entries off
MOST_NOT_CORRECTLY_ROUNDED = 0.01
FLOAT32_EPS = 2.0**-24


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        loaded.update(load_file(shard))
    return loaded


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``x`` (float64), subnormals included."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    exponent = torch.floor(torch.log2(x.abs().clamp(min=info.tiny)))
    return torch.exp2(exponent - mantissa_bits)


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP in float64 over the flattened tensor (lerp when nearly parallel)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    cos = float(torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1))
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def assert_float32_result_rounded_once(
    merged: dict[str, torch.Tensor],
    exact: dict[str, torch.Tensor],
    scale: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Each entry within one ulp of the exact value plus the error float32 arithmetic may add
    (a few float32 ulps of ``scale``, the sum of the magnitudes of the terms), and all but a few
    entries exactly the correctly rounded value."""
    not_rounded, total = 0, 0
    for name, reference in exact.items():
        assert merged[name].dtype == dtype
        ours = merged[name].double()
        bound = ulp(reference, dtype) + 8 * FLOAT32_EPS * scale[name]
        worst = float(((ours - reference).abs() - bound).max())
        assert worst <= 0, f"{name}: off by more than one ulp plus float32 error"
        not_rounded += int((merged[name] != reference.to(dtype)).sum())
        total += reference.numel()
    assert not_rounded <= MOST_NOT_CORRECTLY_ROUNDED * total, f"{not_rounded}/{total} entries"


@pytest.mark.parametrize("dtype", list(HALF))
def test_half_precision_linear_is_the_correctly_rounded_result(llama_family, tmp_path, dtype):
    _, variants = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(v), "parameters": {"weight": w}}
            for v, w in zip(variants, WEIGHTS, strict=True)
        ],
        "dtype": dtype,
    }
    merged = tensors(dammerge.merge(recipe, tmp_path / "out", progress=False))
    half = HALF[dtype]
    inputs = [{n: t.to(half).double() for n, t in tensors(v).items()} for v in variants]
    total = sum(WEIGHTS)
    pairs = list(zip(WEIGHTS, inputs, strict=True))
    exact = {n: sum(w * m[n] for w, m in pairs) / total for n in inputs[0]}
    scale = {n: sum(w * m[n].abs() for w, m in pairs) / total for n in inputs[0]}
    assert_float32_result_rounded_once(merged, exact, scale, half)


@pytest.mark.parametrize("dtype", list(HALF))
def test_half_precision_slerp_is_the_correctly_rounded_result(llama_family, tmp_path, dtype):
    base, variants = llama_family
    recipe = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(variants[0])}],
        "parameters": {"t": 0.35},
        "dtype": dtype,
    }
    merged = tensors(dammerge.merge(recipe, tmp_path / "out", progress=False))
    half = HALF[dtype]
    v0 = {n: t.to(half).double() for n, t in tensors(base).items()}
    v1 = {n: t.to(half).double() for n, t in tensors(variants[0]).items()}
    exact = {n: slerp_reference(0.35, v0[n], v1[n]) for n in v0}
    scale = {n: v0[n].abs() + v1[n].abs() for n in v0}
    assert_float32_result_rounded_once(merged, exact, scale, half)


def test_compute_dtype_computes_in_the_half_dtype_when_asked(llama_family, tmp_path):
    """``compute_dtype: bfloat16`` sums in bfloat16: the result is no longer the correctly
    rounded one (checked against the default on the same recipe)."""
    _, variants = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(v), "parameters": {"weight": w}}
            for v, w in zip(variants, WEIGHTS, strict=True)
        ],
        "dtype": "bfloat16",
    }
    default = tensors(dammerge.merge(recipe, tmp_path / "default", progress=False))
    half = tensors(
        dammerge.merge({**recipe, "compute_dtype": "bfloat16"}, tmp_path / "half", progress=False)
    )
    differing = sum(int((default[n] != half[n]).sum()) for n in default)
    assert differing > 0
    assert all(t.dtype == torch.bfloat16 for t in half.values())


@pytest.mark.parametrize(
    ("settings", "inputs", "compute", "written"),
    [
        ({}, None, torch.float32, None),
        ({"dtype": "bfloat16"}, torch.bfloat16, torch.float32, torch.bfloat16),
        ({"dtype": "float16", "out_dtype": "float32"}, torch.float16, torch.float32, torch.float32),
        ({"dtype": "float64"}, torch.float64, torch.float64, torch.float64),
        ({"dtype": "bf16", "compute_dtype": "fp16"}, torch.bfloat16, torch.float16, torch.bfloat16),
        ({"out_dtype": "float16"}, None, torch.float32, torch.float16),
    ],
)
def test_the_three_dtypes_of_a_plan(llama_family, settings, inputs, compute, written):
    _, variants = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(v), "parameters": {"weight": 1.0}} for v in variants],
        **settings,
    }
    plan = build_plan(MergeConfig.from_dict(recipe))
    assert (plan.input_dtype, plan.compute_dtype, plan.out_dtype) == (inputs, compute, written)
    assert any(line.startswith("dtypes ") for line in describe(plan))


def test_compute_dtype_is_refused_for_learned_methods(llama_family):
    base, variants = llama_family
    recipe = {
        "merge_method": "dam",
        "base_model": str(base),
        "models": [{"model": str(v)} for v in variants[:2]],
        "compute_dtype": "float32",
    }
    with pytest.raises(ConfigError, match="compute_dtype is for data-free merges"):
        load_recipe(recipe)


def test_unknown_compute_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="compute_dtype"):
        MergeConfig.from_dict({"merge_method": "linear", "compute_dtype": "float8"})

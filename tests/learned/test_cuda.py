"""The learned-merge engine on a CUDA GPU: float32 on the GPU gives the CPU's numbers, bf16 on
the GPU trains float32 coefficients and exports a checkpoint that transformers loads.

Skipped where no GPU is visible (CI); run on a lent GPU machine with
``pytest tests/learned/test_cuda.py tests/test_merge_e2e.py -k cuda``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import dammerge
from dammerge.learned import losses
from dammerge.learned.run import train_plan

from .helpers import ALL_MERGED, IDS, build_merged, naive_forward_kl, training_plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _merged(family, device: str, dtype: torch.dtype):
    return build_merged(family, ALL_MERGED, device=device, dtype=dtype)


def test_merged_model_on_gpu_matches_cpu(untied_family):
    cpu = _merged(untied_family, "cpu", torch.float32)
    gpu = _merged(untied_family, "cuda", torch.float32)
    gpu_bf16 = _merged(untied_family, "cuda", torch.bfloat16)
    with torch.no_grad():
        expected = cpu(IDS)
        torch.testing.assert_close(gpu(IDS.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
        low = gpu_bf16(IDS.cuda()).float().cpu()
        for i in range(len(untied_family[1])):
            with cpu.teacher(i), gpu_bf16.teacher(i):
                teacher = gpu_bf16(IDS.cuda()).float().cpu()
                torch.testing.assert_close(teacher, cpu(IDS), rtol=0.05, atol=0.05)
    torch.testing.assert_close(low, expected, rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 and p.is_cuda for _, p in gpu_bf16.coefficient_groups())


def test_forward_kl_with_grad_on_gpu_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    merged = (torch.randn(64, 1000, generator=generator) * 3).cuda()
    teacher = (torch.randn(64, 1000, generator=generator) * 3).cuda()
    leaf = merged.clone().requires_grad_(True)
    expected = naive_forward_kl(leaf, teacher, 2.0)
    expected.backward()
    grad = torch.empty_like(merged)
    value = losses.forward_kl_with_grad(merged.clone(), teacher, grad, temperature=2.0)
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad, leaf.grad)


@pytest.mark.parametrize("teacher", ["on_the_fly", "precomputed"])
def test_float32_training_on_gpu_follows_cpu(
    untied_family, datasets_dir, tmp_path, dam_recipe, teacher
):
    options = {"steps": 3, "teacher": teacher, "top_k": 128}
    states = {}
    for device in ("cpu", "cuda"):
        plan = training_plan(
            dam_recipe, untied_family, datasets_dir, tmp_path / device, device=device, **options
        )
        model, result = train_plan(plan, progress=False)
        assert result.steps == 3
        states[device] = {k: v.cpu() for k, v in model.coefficient_state().items()}
    for name, value in states["cpu"].items():
        torch.testing.assert_close(states["cuda"][name], value, rtol=1e-4, atol=1e-5)
        assert not torch.equal(value, torch.full_like(value, 0.5))  # training moved them


def test_bf16_dam_merge_on_gpu_exports_a_loadable_checkpoint(
    untied_family, datasets_dir, tmp_path, dam_recipe
):
    recipe = dam_recipe(*untied_family, datasets_dir, steps=3, dtype="bfloat16")
    out = tmp_path / "out"
    dammerge.merge(recipe, out, device="cuda", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()

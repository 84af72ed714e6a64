"""Correctness of the fast paths that bench/dam_step.py exercises.

- the fused training step (all sources in one forward/backward) moves the coefficients exactly
  as the per-source step does, with sources of different lengths (padding) and prompt-masked
  positions (a non-contiguous gather), for on-the-fly and precomputed teachers;
- the hand-written chunked KL functions against plain autograd (values and gradcheck);
- the merged linear layer's CPU scratch buffers give the same result across layers of
  different shapes as the naive formulation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dammerge.checkpoint.reader import Checkpoint
from dammerge.data.examples import Example
from dammerge.learned import losses
from dammerge.learned.data import SourceData
from dammerge.learned.functional import merged_linear, naive_merged_linear
from dammerge.learned.model import build_merged_model
from dammerge.learned.presets import DAM
from dammerge.learned.settings import parse_settings
from dammerge.learned.teachers import OnTheFlyTeacher, precompute_teachers
from dammerge.learned.train import Trainer
from dammerge.testing import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("dam-step")
    return make_family(root, "llama", n=2, tie_word_embeddings=False, num_hidden_layers=2)


def _data(seed: int) -> list[SourceData]:
    """Two sources, batch 2, lengths 5..11; source 1 counts only its 'response' tokens."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for source in range(2):
        examples = []
        for _ in range(4):
            n = int(torch.randint(5, 12, (1,), generator=generator))
            ids = torch.randint(3, 128, (n,), generator=generator).tolist()
            prompt = 3 if source == 1 else 0
            examples.append(Example(ids, [False] * prompt + [True] * (n - prompt)))
        out.append(SourceData(examples, seed=seed, source=source, batch_size=2, pad_id=2))
    return out


def _train(family, tmp_path, teacher: str, fuse: bool, steps: int = 3) -> dict:
    base, sources = family
    settings = parse_settings({"teacher": teacher, "top_k": 128, "lambda_l1": 1e-4}, DAM)
    checkpoints = [Checkpoint(s) for s in sources]
    data = _data(0)
    model = build_merged_model(
        Checkpoint(base), checkpoints, keep_teacher_weights=teacher == "on_the_fly"
    )
    if teacher == "on_the_fly":
        signal = OnTheFlyTeacher(model)
    else:
        signal = precompute_teachers(
            checkpoints,
            data,
            128,
            tmp_path / "teachers",
            device=torch.device("cpu"),
            dtype=torch.float32,
            progress=False,
        )
    trainer = Trainer(
        model,
        data,
        signal,
        settings,
        tmp_path / "work",
        device=torch.device("cpu"),
        progress=False,
        fuse_sources=fuse,
    )
    terms = [trainer.train_step() for _ in range(steps)]
    return {"coefficients": model.coefficient_state(), "terms": terms}


@pytest.mark.parametrize("teacher", ["on_the_fly", "precomputed"])
def test_fused_step_equals_per_source_step(family, tmp_path, teacher):
    fused = _train(family, tmp_path / "fused", teacher, fuse=True)
    separate = _train(family, tmp_path / "separate", teacher, fuse=False)
    for a, b in zip(fused["terms"], separate["terms"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    for name, value in fused["coefficients"].items():
        torch.testing.assert_close(value, separate["coefficients"][name], rtol=0, atol=1e-6)
    moved = max(float((v - 0.5).abs().max()) for v in fused["coefficients"].values())
    assert moved > 1e-4  # the comparison is not between two untouched initialisations


def _reference_kl(s, t, temperature):
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_forward_kl_matches_autograd(chunk, temperature):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(7, 11, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(7, 11, dtype=torch.float64, generator=g)
    ours = losses.kl_divergence(s, t, None, temperature=temperature, chunk=chunk)
    expected = _reference_kl(s, t, temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    (grad_ours,) = torch.autograd.grad(ours, s)
    (grad_ref,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: losses.kl_divergence(x, t, None, temperature=temperature, chunk=chunk), (s,)
    )


@pytest.mark.parametrize("chunk", [None, 2])
def test_chunked_topk_kl_matches_autograd(chunk):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 13, dtype=torch.float64, generator=g, requires_grad=True)
    values, indices = torch.randn(6, 13, dtype=torch.float64, generator=g).topk(4, dim=-1)

    def reference(x):
        log_p = F.log_softmax(values / 2.0, -1)
        log_q = F.log_softmax(x / 2.0, -1).gather(-1, indices)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 4.0

    ours = losses.topk_kl_divergence(s, values, indices, None, temperature=2.0, chunk=chunk)
    torch.testing.assert_close(ours, reference(s), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: losses.topk_kl_divergence(x, values, indices, None, temperature=2.0, chunk=chunk),
        (s,),
    )


def test_scratch_buffers_across_layer_shapes():
    """Layers of different shapes in turn (the buffers grow and are sliced) stay exact."""
    g = torch.Generator().manual_seed(3)
    for out, inp in [(7, 5), (3, 9), (11, 4), (7, 5)]:
        x = torch.randn(2, 4, inp, generator=g, requires_grad=True)
        scales = torch.randn(3, inp, generator=g, requires_grad=True)
        weights = torch.randn(3, out, inp, generator=g)
        upstream = torch.randn(2, 4, out, generator=g)
        results = []
        for fn in (merged_linear, naive_merged_linear):
            y = fn(x, scales, weights)
            results.append((y, *torch.autograd.grad(y, (x, scales), upstream)))
        for ours, naive in zip(*results, strict=True):
            torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)

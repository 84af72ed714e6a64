"""Objectives and regularisers against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from dammerge.learned import losses
from dammerge.scoring.divergence import kl_to_teacher

from .helpers import naive_forward_kl


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _logits(seed: int, shape=(2, 3, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MASK = torch.tensor([[True, False, True], [True, True, False]])


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [t[b, s].tolist() for b in range(2) for s in range(3) if MASK[b, s]]


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_matches_hand_computation(direction):
    merged, teacher, temp = _logits(0), _logits(1), 2.0
    expected = []
    for m_row, t_row in zip(_rows(merged), _rows(teacher), strict=True):
        p, q = _softmax(t_row, temp), _softmax(m_row, temp)
        a, b = (p, q) if direction == "forward" else (q, p)
        expected.append(sum(x * math.log(x / y) for x, y in zip(a, b, strict=True)))
    value = losses.kl_divergence(merged, teacher, MASK, temperature=temp, direction=direction)
    assert value.item() == pytest.approx(sum(expected) / len(expected) * temp**2, rel=1e-6)


def test_kl_is_zero_for_identical_and_positive_otherwise():
    a = _logits(0)
    assert losses.kl_divergence(a, a.clone(), MASK).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.kl_divergence(a, _logits(1), MASK).item() > 0


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_with_full_vocabulary_equals_full_kl(direction):
    merged, teacher = _logits(0), _logits(1)
    values, indices = teacher.topk(5, dim=-1)
    full = losses.kl_divergence(merged, teacher, MASK, temperature=2.0, direction=direction)
    top = losses.topk_kl_divergence(
        merged, values, indices, MASK, temperature=2.0, direction=direction
    )
    assert top.item() == pytest.approx(full.item(), rel=1e-9)


def test_topk_forward_kl_hand_computation():
    merged, teacher = _logits(0), _logits(1)
    values, indices = teacher.topk(2, dim=-1)
    expected = []
    for b in range(2):
        for s in range(3):
            if not MASK[b, s]:
                continue
            p = _softmax(values[b, s].tolist())
            q = _softmax(merged[b, s].tolist())
            idx = indices[b, s].tolist()
            expected.append(sum(pk * math.log(pk / q[i]) for pk, i in zip(p, idx, strict=True)))
    value = losses.topk_kl_divergence(merged, values, indices, MASK)
    assert value.item() == pytest.approx(sum(expected) / len(expected), rel=1e-9)


def test_mse_and_topk_mse():
    merged, teacher = _logits(0), _logits(1)
    diffs = [
        sum((m - t) ** 2 for m, t in zip(mr, tr, strict=True)) / 5
        for mr, tr in zip(_rows(merged), _rows(teacher), strict=True)
    ]
    value = losses.mse_logits(merged, teacher, MASK)
    assert value.item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-9)
    values, indices = teacher.topk(5, dim=-1)
    top = losses.topk_mse_logits(merged, values, indices, MASK)
    assert top.item() == pytest.approx(value.item(), rel=1e-9)


def test_entropy_hand_computation_and_bounds():
    merged = _logits(3)
    rows = [_softmax(r) for r in _rows(merged)]
    expected = sum(-sum(p * math.log(p) for p in row) for row in rows) / len(rows)
    assert losses.entropy(merged, MASK).item() == pytest.approx(expected, rel=1e-9)
    uniform = torch.zeros(1, 1, 7)
    assert losses.entropy(uniform).item() == pytest.approx(math.log(7), rel=1e-6)


def test_chunking_changes_neither_value_nor_gradient():
    merged = _logits(0, (2, 6, 11)).requires_grad_(True)
    teacher = _logits(1, (2, 6, 11))
    grads = []
    for chunk in (None, 2):
        loss = losses.kl_divergence(merged, teacher, temperature=2.0, chunk=chunk)
        grads.append((loss.detach(), torch.autograd.grad(loss, merged)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_cosine_l1_l2_hand_computation():
    a = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    # group a: all three pairwise cosines are 1/2; group b: -1
    assert losses.cosine_similarity_loss([a, b]).item() == pytest.approx((0.5 - 1.0) / 2)
    assert losses.l1_loss([a, b]).item() == pytest.approx(6 + 3)
    assert losses.l2_loss([a, b]).item() == pytest.approx(6 + 5)


def test_cosine_skips_single_participant_and_vectors():
    assert losses.cosine_similarity_loss([torch.ones(1, 4), torch.ones(3)]).item() == 0.0


def test_cosine_gradient_pushes_vectors_apart():
    a = torch.tensor([[1.0, 0.2], [0.9, 0.3]], requires_grad=True)
    loss = losses.cosine_similarity_loss([a])
    loss.backward()
    with torch.no_grad():
        moved = a - 0.1 * a.grad
    assert losses.cosine_similarity_loss([moved]).item() < loss.item()


@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("in_place", [False, True])
def test_forward_kl_with_grad_equals_autograd_of_the_definition(top_k, in_place):
    """The hand-differentiated KL (chunked, with a tail chunk, writing its gradient over the
    logits themselves when asked) gives autograd's value and gradient."""
    merged = _logits(0, (7, 13)) * 3
    teacher = _logits(1, (7, 13)) * 3
    if top_k is None:
        signal, values = teacher, None
        reference_teacher = teacher
    else:
        values, signal = teacher.topk(top_k, dim=-1)
        # the top-K teacher is the full teacher with every other logit at -inf
        reference_teacher = torch.full_like(teacher, -math.inf).scatter(-1, signal, values)
    leaf = merged.clone().requires_grad_(True)
    if top_k is None:
        expected = naive_forward_kl(leaf, reference_teacher, 2.0)
    else:
        log_p = torch.log_softmax(values / 2.0, dim=-1)
        log_q = torch.log_softmax(leaf / 2.0, dim=-1).gather(-1, signal)
        expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 4.0
    expected.backward()
    logits = merged.clone()
    grad_out = logits if in_place else torch.empty_like(logits)
    value = losses.forward_kl_with_grad(
        logits, signal, grad_out, temperature=2.0, values=values, chunk=3
    )
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad_out, leaf.grad)


def test_forward_kl_with_grad_into_bf16_rounds_the_difference_once():
    """With bf16 logits the gradient q − p is formed in float32 and rounded once: near the
    optimum (q ≈ p) rounding q and p apart would leave mostly rounding noise."""
    teacher = _logits(1, (4, 50)).float() * 4
    merged = (teacher + 1e-2 * _logits(2, (4, 50)).float()).bfloat16()
    grad_out = torch.empty_like(merged)
    losses.forward_kl_with_grad(merged, teacher.bfloat16(), grad_out, temperature=1.0)
    leaf = merged.float().requires_grad_(True)
    naive_forward_kl(leaf, teacher.bfloat16().float(), 1.0).backward()
    torch.testing.assert_close(grad_out, leaf.grad.bfloat16(), rtol=1e-2, atol=1e-5)


def test_forward_kl_with_grad_of_no_rows_is_zero():
    empty = torch.zeros(0, 9)
    assert losses.forward_kl_with_grad(empty, empty, empty.clone()).item() == 0.0


@pytest.mark.parametrize("scale", [1e-3, 1.0, 60.0])
def test_forward_kl_with_grad_holds_for_flat_and_peaked_distributions(scale):
    """The log-sum-exp taken from the row's largest probability stays exact whether the
    distributions are nearly uniform or nearly one-hot (float32 against a float64 reference)."""
    merged = _logits(3, (6, 1000)).float() * scale
    teacher = _logits(4, (6, 1000)).float() * scale
    leaf = merged.double().requires_grad_(True)
    expected = naive_forward_kl(leaf, teacher.double(), 2.0)
    expected.backward()
    grad_out = torch.empty_like(merged)
    value = losses.forward_kl_with_grad(merged, teacher, grad_out, temperature=2.0)
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_out.double(), leaf.grad, rtol=1e-4, atol=1e-9)


# The DAM objective is T² times the shared KL definition; its fused kernels must agree with it.
def _shared_loss(merged, teacher, mask, *, temperature, direction, indices=None):
    return temperature**2 * kl_to_teacher(
        merged,
        teacher,
        mask,
        temperature=temperature,
        direction=direction,
        teacher_indices=indices,
    )


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("chunk", [None, 2])
def test_kl_objectives_are_t_squared_times_the_shared_definition(direction, top_k, chunk):
    merged, teacher, temperature = _logits(0) * 3, _logits(1) * 3, 2.0
    ours = merged.clone().requires_grad_(True)
    shared = merged.clone().requires_grad_(True)
    options = {"temperature": temperature, "direction": direction}
    if top_k is None:
        value = losses.kl_divergence(ours, teacher, MASK, chunk=chunk, **options)
        expected = _shared_loss(shared, teacher, MASK, **options)
    else:
        values, indices = teacher.topk(top_k, dim=-1)
        value = losses.topk_kl_divergence(ours, values, indices, MASK, chunk=chunk, **options)
        expected = _shared_loss(shared, values, MASK, indices=indices, **options)
    value.backward()
    expected.backward()
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(ours.grad, shared.grad)


@pytest.mark.parametrize("top_k", [None, 4])
def test_fused_forward_kl_gradient_is_that_of_the_shared_definition(top_k):
    merged, teacher = _logits(0, (7, 13)) * 3, _logits(1, (7, 13)) * 3
    leaf = merged.clone().requires_grad_(True)
    if top_k is None:
        signal, values = teacher, None
        expected = _shared_loss(leaf, teacher, None, temperature=2.0, direction="forward")
    else:
        values, signal = teacher.topk(top_k, dim=-1)
        expected = _shared_loss(
            leaf, values, None, temperature=2.0, direction="forward", indices=signal
        )
    expected.backward()
    grad_out = torch.empty_like(merged)
    value = losses.forward_kl_with_grad(
        merged.clone(), signal, grad_out, temperature=2.0, values=values, chunk=3
    )
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad_out, leaf.grad)


def _fake_cuda_memory(monkeypatch, free: int, reserved: int = 0, allocated: int = 0) -> None:
    """What torch.cuda would report: ``free`` bytes to the driver, ``reserved`` held by
    torch's caching allocator, of which ``allocated`` are in use."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2**40))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_loss_chunks_on_a_cpu_keep_their_cache_sized_elements(monkeypatch):
    _fake_cuda_memory(monkeypatch, free=2**40)  # not consulted on a CPU
    cpu = torch.device("cpu")
    assert losses.chunk_elements(cpu, 2**20, 16) == 2**20
    assert losses._rows_per_chunk(32000, None, cpu) == 2**20 // 32000  # 32 positions
    assert losses._rows_per_chunk(32000, 7, cpu) == 7


@pytest.mark.parametrize(
    ("free", "expected"),
    [
        (2**40, 2**26),  # plenty: 2^26 elements (a 2,048 × 32k chunk), no more
        (2**31, 2**31 // (4 * 16)),  # 2 GiB free: a quarter of it for 16 B per element
        (2**24, 2**20),  # almost nothing: never below the CPU's chunk
    ],
)
def test_loss_chunks_on_cuda_are_bounded_by_free_memory(monkeypatch, free, expected):
    _fake_cuda_memory(monkeypatch, free=free)
    assert losses.chunk_elements(torch.device("cuda"), 2**20, 16) == expected


def test_memory_cached_by_torch_counts_as_free(monkeypatch):
    """256 MiB free to the driver and 1 GiB reserved by torch's allocator but not in use."""
    _fake_cuda_memory(monkeypatch, free=2**28, reserved=2**30 + 2**29, allocated=2**29)
    cuda = torch.device("cuda")
    assert losses.free_device_bytes(cuda) == 2**28 + 2**30
    assert losses.chunk_elements(cuda, 2**20, 32) == (2**28 + 2**30) // (4 * 32)


def test_fused_kl_chunks_on_cuda_hold_a_sources_positions(monkeypatch):
    _fake_cuda_memory(monkeypatch, free=2**40)
    cuda = torch.device("cuda")
    assert losses._rows_per_chunk(32000, None, cuda) == 2**26 // 32000 >= 2048
    assert losses._rows_per_chunk(128256, None, cuda) == 2**26 // 128256  # 523 of 128k

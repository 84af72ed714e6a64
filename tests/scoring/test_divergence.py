"""The shared KL-to-teacher definition against loops over explicit softmaxes."""

from __future__ import annotations

import math

import pytest
import torch

from dammerge.scoring.divergence import kl_per_position, kl_to_teacher, log_probs

MASK = torch.tensor([[True, False, True], [True, True, False]])


def _logits(seed: int, shape=(2, 3, 7)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 2


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    top = max(row)
    exps = [math.exp((v - top) / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _counted(x: torch.Tensor) -> list[list[float]]:
    return [x[b, s].tolist() for b in range(2) for s in range(3) if MASK[b, s]]


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_to_teacher_matches_a_loop(direction, temperature):
    student, teacher = _logits(0), _logits(1)
    expected = []
    for s_row, t_row in zip(_counted(student), _counted(teacher), strict=True):
        p, q = _softmax(t_row, temperature), _softmax(s_row, temperature)
        expected.append(_kl(p, q) if direction == "forward" else _kl(q, p))
    rows = kl_to_teacher(
        student, teacher, MASK, temperature=temperature, direction=direction, reduction="none"
    )
    assert rows.tolist() == pytest.approx(expected, rel=1e-12)
    kwargs = {"temperature": temperature, "direction": direction}
    total = kl_to_teacher(student, teacher, MASK, reduction="sum", **kwargs)
    assert total.item() == pytest.approx(sum(expected), rel=1e-12)
    mean = kl_to_teacher(student, teacher, MASK, **kwargs)
    assert mean.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_no_mask_counts_every_position_and_an_empty_mask_gives_zero():
    student, teacher = _logits(0), _logits(1)
    everything = kl_to_teacher(student, teacher, torch.ones(2, 3, dtype=torch.bool))
    assert kl_to_teacher(student, teacher).item() == pytest.approx(everything.item(), rel=1e-12)
    nothing = kl_to_teacher(student, teacher, torch.zeros(2, 3, dtype=torch.bool))
    assert nothing.item() == 0.0


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_teacher_is_renormalised_over_its_entries(direction):
    student, teacher, k, temperature = _logits(0), _logits(1), 3, 2.0
    values, indices = teacher.topk(k, dim=-1)
    expected = []
    for b in range(2):
        for s in range(3):
            if not MASK[b, s]:
                continue
            p = _softmax(values[b, s].tolist(), temperature)
            chosen = indices[b, s].tolist()
            if direction == "forward":  # full-vocabulary q at the teacher's entries
                full_q = _softmax(student[b, s].tolist(), temperature)
                expected.append(_kl(p, [full_q[i] for i in chosen]))
            else:  # q renormalised over the same entries
                q = _softmax([student[b, s, i].item() for i in chosen], temperature)
                expected.append(_kl(q, p))
    value = kl_to_teacher(
        student,
        values,
        MASK,
        temperature=temperature,
        direction=direction,
        teacher_indices=indices,
        reduction="none",
    )
    assert value.tolist() == pytest.approx(expected, rel=1e-12)


def test_tokens_the_teacher_rules_out_contribute_nothing():
    teacher = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))  # log 0 = -inf
    student = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert kl_per_position(teacher, student).item() == pytest.approx(math.log(2))
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]])
    other = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    assert kl_to_teacher(other, logits).item() == pytest.approx(math.log(2))


def test_gradients_flow_to_the_student():
    student = _logits(0).requires_grad_(True)
    kl_to_teacher(student, _logits(1), MASK, temperature=2.0).backward()
    assert student.grad is not None and student.grad[~MASK].abs().sum() == 0
    assert student.grad[MASK].abs().sum() > 0


def test_log_probs_widen_low_precision_and_keep_float64():
    logits = _logits(0)
    assert log_probs(logits.bfloat16()).dtype == torch.float32
    assert log_probs(logits).dtype == torch.float64
    expected = torch.log_softmax(logits / 2.0, dim=-1)
    torch.testing.assert_close(log_probs(logits, 2.0), expected)


def test_unknown_direction_or_reduction_is_refused():
    student, teacher = _logits(0), _logits(1)
    with pytest.raises(ValueError, match="direction"):
        kl_to_teacher(student, teacher, direction="backward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        kl_to_teacher(student, teacher, reduction="max")  # type: ignore[arg-type]

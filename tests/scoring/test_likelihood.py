"""NLL and KL helpers against direct computations (explicit softmax, loops, torch's kl_div)."""

from __future__ import annotations

import math

import pytest
import torch

from dammerge.scoring.divergence import kl_per_position, log_probs
from dammerge.scoring.likelihood import (
    masked_kl,
    masked_mean,
    masked_mean_nll,
    next_token_positions,
    token_log_likelihoods,
)


def _softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


@pytest.fixture
def case():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator) * 3
    other = torch.randn(2, 5, 7, generator=generator) * 3
    targets = torch.randint(0, 7, (2, 5), generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    return logits, other, targets, mask


def test_log_probs_are_a_normalised_log_softmax(case):
    logits = case[0]
    expected = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    assert torch.allclose(log_probs(logits), expected, atol=1e-6)
    assert log_probs(logits.bfloat16()).dtype == torch.float32


def test_masked_mean_nll_matches_a_loop(case):
    logits, _, targets, mask = case
    total, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                p = _softmax_row(logits[b, t].tolist())
                total -= math.log(p[targets[b, t]])
                count += 1
    assert masked_mean_nll(logits, targets, mask) == pytest.approx(total / count, rel=1e-6)


def test_token_log_likelihoods_pick_the_target(case):
    logits, _, targets, _ = case
    rows = log_probs(logits[0])
    picked = token_log_likelihoods(rows, targets[0])
    for t in range(5):
        assert picked[t] == rows[t, targets[0, t]]


def test_kl_matches_a_loop_and_torch_kl_div(case):
    teacher, student, _, mask = case
    loop_total, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                p = _softmax_row(teacher[b, t].tolist())
                q = _softmax_row(student[b, t].tolist())
                loop_total += sum(
                    pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True)
                )
                count += 1
    assert masked_kl(teacher, student, mask) == pytest.approx(loop_total / count, rel=1e-5)
    reference = torch.nn.functional.kl_div(
        log_probs(student), log_probs(teacher), log_target=True, reduction="none"
    ).sum(-1)
    assert torch.allclose(
        kl_per_position(log_probs(teacher), log_probs(student)), reference, atol=1e-6
    )


def test_kl_of_a_distribution_to_itself_is_zero_and_otherwise_positive(case):
    teacher, student, _, mask = case
    assert masked_kl(teacher, teacher, mask) == 0.0
    assert masked_kl(teacher, student, mask) > 0.0


def test_kl_ignores_tokens_the_teacher_rules_out():
    teacher = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))  # log 0 = -inf
    student = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert kl_per_position(teacher, student).item() == pytest.approx(math.log(2))


def test_masked_mean_and_empty_mask():
    values = torch.tensor([1.0, 2.0, 6.0])
    assert masked_mean(values, torch.tensor([1, 0, 1])) == pytest.approx(3.5)
    assert math.isnan(masked_mean(values, torch.zeros(3)))


def test_next_token_positions_predict_the_response():
    # prompt of 4 tokens (0..3), response of 3 tokens (4..6): logits at 3, 4, 5 predict them.
    assert next_token_positions(4, 3).tolist() == [3, 4, 5]
    with pytest.raises(ValueError):
        next_token_positions(0, 2)

"""Token-level likelihood metrics: response NLL and KL to a specialist.

Small pure functions over tensors, so each one can be checked against a direct computation.
Conventions: ``logits`` are ``[..., vocab]``; a *log-prob row* is ``log_softmax`` of one position's
logits, in float32 (bf16 log-probs lose the differences the KL is made of; see
:func:`dammerge.scoring.divergence.log_probs`). Means are token-weighted: a domain's NLL is the
sum over all its response tokens divided by their number, as perplexity is defined, so long
responses are not under-weighted. The KL is :mod:`dammerge.scoring.divergence`'s.
"""

from __future__ import annotations

import torch

from dammerge.scoring.divergence import kl_per_position, log_probs


def next_token_positions(prompt_length: int, response_length: int) -> torch.Tensor:
    """Positions whose logits predict the response tokens of ``prompt + response``.

    In a causal LM, the logits at position ``t`` predict token ``t + 1``; the first response
    token (at index ``prompt_length``) is therefore predicted at ``prompt_length - 1``.
    """
    if prompt_length < 1:
        raise ValueError("a response can only be scored after at least one prompt token")
    return torch.arange(prompt_length - 1, prompt_length - 1 + response_length)


def token_log_likelihoods(logprob_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target_t)`` for each row ``t`` of ``logprob_rows`` ([T, V]) and ``targets`` ([T])."""
    return logprob_rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def masked_sum_and_count(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum of ``values`` where ``mask`` is true and how many there are (token-weighted means)."""
    mask = mask.bool()
    return float(values[mask].double().sum()), int(mask.sum())


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over the positions where ``mask`` is true (NaN if there are none)."""
    total, count = masked_sum_and_count(values, mask)
    return total / count if count else float("nan")


def masked_mean_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``targets`` under ``logits`` over the masked positions.

    ``logits`` [..., T, V] are already aligned with ``targets`` [..., T] (row t predicts
    target t); ``mask`` marks the response tokens (prompt and padding excluded).
    """
    nll = -token_log_likelihoods(log_probs(logits), targets)
    return masked_mean(nll, mask)


def masked_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor
) -> float:
    """Mean KL(teacher ‖ student) over the masked positions of aligned logits [..., T, V]."""
    kl = kl_per_position(log_probs(teacher_logits), log_probs(student_logits))
    return masked_mean(kl, mask)

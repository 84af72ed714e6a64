"""KL divergence to a teacher: the one definition behind DAM's loss, evolve's fitness and the
evaluator's KL.

At one position, with logits divided by the temperature ``T`` and widened to float32 (float64
stays float64)::

    p = softmax(teacher / T)        q = softmax(student / T)        (over the vocabulary)

- ``forward`` (the default): ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)``, how much of what the
  teacher predicts the student has lost. DAM distils with it, evolution scores candidates with
  it, and the evaluator reports it against each domain's specialist.
- ``reverse``: ``KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)``.
- A *top-K* teacher is known by its K largest logits and their vocabulary indices: ``p`` is the
  teacher renormalised over those K entries. Forward KL compares it with the student's
  full-vocabulary ``log q`` at those entries; reverse KL renormalises ``q`` over the same K
  entries (against a teacher with zeros elsewhere the full reverse KL would be infinite).

Terms whose probability under the first distribution is 0 contribute 0 (``0 · log 0 = 0``), so
``-inf`` log-probabilities are safe. A boolean ``mask`` selects the positions that count; the
reduction is per position, their sum, or their mean (0 when no position counts). There is no
``T²`` factor: a distillation loss that wants gradients of the same size at every ``T`` (DAM)
multiplies by ``T²`` itself.
"""

from __future__ import annotations

from typing import Literal

import torch


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the last dimension, in float32 or wider."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        wide = wide / temperature
    return torch.log_softmax(wide, dim=-1)


def kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` at each position, from log-probabilities.

    Terms with ``p_v = 0`` contribute 0, so ``-inf`` entries of ``log_p`` are safe.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)


def _positions(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., V) -> (n, V): the counted positions only."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def kl_to_teacher(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    direction: Literal["forward", "reverse"] = "forward",
    teacher_indices: torch.Tensor | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
) -> torch.Tensor:
    """KL between the teacher's and the student's next-token distributions (see the module).

    Args:
        student_logits: ``(..., V)`` logits of the model being scored or trained.
        teacher_logits: ``(..., V)`` logits, or ``(..., K)`` top-K values with
            ``teacher_indices``.
        mask: boolean ``(...)``: the positions that count (None: all of them).
        temperature: ``T``, dividing both sides' logits.
        direction: ``forward`` = KL(teacher ‖ student), ``reverse`` = KL(student ‖ teacher).
        teacher_indices: ``(..., K)`` vocabulary indices of a top-K teacher's values.
        reduction: ``none`` (one value per counted position), ``sum`` or ``mean``.

    Returns:
        The divergence in nats, float32 or wider; differentiable in both inputs.
    """
    student = _positions(student_logits, mask)
    teacher = log_probs(_positions(teacher_logits, mask), temperature)
    if teacher_indices is None:
        student_lp = log_probs(student, temperature)
    else:
        indices = _positions(teacher_indices, mask).long()
        if direction == "forward":
            student_lp = log_probs(student, temperature).gather(-1, indices)
        else:
            student_lp = log_probs(student.gather(-1, indices), temperature)
    if direction == "forward":
        rows = kl_per_position(teacher, student_lp)
    elif direction == "reverse":
        rows = kl_per_position(student_lp, teacher)
    else:
        raise ValueError(f"unknown KL direction {direction!r} (use forward or reverse)")
    if reduction == "none":
        return rows
    if reduction == "mean" and rows.numel():
        return rows.mean()
    if reduction in ("sum", "mean"):
        return rows.sum()  # a mean over no position is 0
    raise ValueError(f"unknown reduction {reduction!r} (use none, sum or mean)")

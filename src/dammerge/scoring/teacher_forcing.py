"""Teacher-forced log-probs of reference responses, and token-weighted NLL / KL totals.

A response's NLL and its KL to a teacher both need, for each response token, the model's
log-prob row given the prompt and the reference tokens before it. Batches are right-padded
(real tokens keep their natural positions) and ordered by length only, so every model (and a
teacher scored against itself) sees exactly the same batches: KL(teacher ‖ teacher) is exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dammerge.data.examples import Example, collate
from dammerge.scoring.divergence import kl_per_position, log_probs
from dammerge.scoring.generation import context_limit
from dammerge.scoring.likelihood import next_token_positions, token_log_likelihoods


def fit_to_context(example: Example, limit: int | None) -> Example:
    """Cut the prompt from the left so that prompt + response fit the model (response kept)."""
    if limit is None or len(example) <= limit:
        return example
    response = example.response_ids
    keep = max(limit - len(response), 1)
    return Example.from_parts(example.prompt_ids[-keep:], response[: limit - keep])


@torch.no_grad()
def iter_response_logprobs(
    model: Any,
    examples: Sequence[Example],
    *,
    pad: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(index, rows)``: float32 log-prob rows [response length, vocab] per example.

    Row ``t`` is the model's distribution over response token ``t`` (teacher-forced).
    """
    device = next(model.parameters()).device
    limit = context_limit(model)
    fitted = [fit_to_context(example, limit) for example in examples]
    order = sorted(range(len(fitted)), key=lambda i: (-len(fitted[i]), i))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([fitted[i] for i in chunk], chunk, pad)
        logits = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        ).logits
        for row, index in enumerate(chunk):
            example = fitted[index]
            positions = next_token_positions(example.response_start, len(example.response_ids))
            yield index, log_probs(logits[row, positions.to(device)]).cpu()
        if on_batch is not None:
            on_batch(len(chunk))


def response_targets(example: Example, limit: int | None) -> torch.Tensor:
    """The response token ids that :func:`iter_response_logprobs` scores for ``example``."""
    return torch.tensor(fit_to_context(example, limit).response_ids)


@dataclass
class LikelihoodTotals:
    """Running token-weighted sums for a domain's NLL and KL."""

    nll_sum: float = 0.0
    kl_sum: float = 0.0
    tokens: int = 0

    def add(self, rows: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None) -> None:
        self.nll_sum -= float(token_log_likelihoods(rows, targets).double().sum())
        if teacher is not None:
            self.kl_sum += float(kl_per_position(teacher, rows).double().sum())
        self.tokens += len(targets)

    def nll(self) -> float | None:
        return self.nll_sum / self.tokens if self.tokens else None

    def kl(self) -> float | None:
        return self.kl_sum / self.tokens if self.tokens else None

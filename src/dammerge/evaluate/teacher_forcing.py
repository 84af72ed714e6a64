"""Teacher-forced log-probs of reference responses, and the specialists' cache of them.

A domain's NLL and KL both need, for each response token, the model's log-prob row given the
prompt and the reference tokens before it. Batches are right-padded (real tokens keep their
natural positions) and ordered by length only, so every model (and a specialist scored
against itself) sees exactly the same batches: KL(specialist ‖ specialist) is exactly 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge.evaluate.data import DomainData, Example, encode_example
from dammerge.evaluate.generation import context_limit, pad_id
from dammerge.evaluate.likelihood import (
    kl_per_position,
    log_probs,
    next_token_positions,
    token_log_likelihoods,
)


def right_pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask for ``rows``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def fit_to_context(example: Example, limit: int | None) -> Example:
    """Cut the prompt from the left so that prompt + response fit the model (response kept)."""
    if limit is None or len(example.ids) <= limit:
        return example
    keep = max(limit - len(example.response_ids), 1)
    return Example(example.prompt_ids[-keep:], example.response_ids[: limit - keep])


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
    order = sorted(range(len(fitted)), key=lambda i: (-len(fitted[i].ids), i))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = right_pad([fitted[i].ids for i in chunk], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, index in enumerate(chunk):
            example = fitted[index]
            positions = next_token_positions(len(example.prompt_ids), len(example.response_ids))
            yield index, log_probs(logits[row, positions.to(device)]).cpu()
        if on_batch is not None:
            on_batch(len(chunk))


def response_targets(example: Example, limit: int | None) -> torch.Tensor:
    """The response token ids that :func:`iter_response_logprobs` scores for ``example``."""
    return torch.tensor(fit_to_context(example, limit).response_ids)


@dataclass
class TeacherCache:
    """Each specialist's teacher-forced log-prob rows per domain, computed once and reused.

    Evaluating several models (or, in evolution, hundreds of candidates) needs the specialist's
    distribution on the same tokens every time; this keeps it in memory, keyed by domain,
    specialist folder and the exact token ids, so a different tokenizer or record subset is
    never served stale rows. Memory: response tokens × vocabulary × 4 bytes per domain.
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 16
    progress: bool = True
    _rows: dict[tuple, list[torch.Tensor] | None] = field(default_factory=dict, repr=False)

    def rows(self, domain: DomainData, tokenizer: Any) -> list[torch.Tensor] | None:
        """The specialist's log-prob rows for the domain's records, tokenized by ``tokenizer``.

        None when the domain has no specialist, or when the specialist's vocabulary differs
        from ``tokenizer``'s (the two distributions would not be over the same tokens).
        """
        if domain.specialist_dir is None:
            return None
        examples = [encode_example(tokenizer, record) for record in domain.records]
        key = (domain.name, str(Path(domain.specialist_dir).resolve()), _ids_key(examples))
        if key not in self._rows:
            self._rows[key] = self._compute(domain, examples, tokenizer.get_vocab())
        return self._rows[key]

    def _compute(
        self, domain: DomainData, examples: list[Example], vocab: dict[str, int]
    ) -> list[torch.Tensor] | None:
        from dammerge.evaluate.loading import load_model

        model, tokenizer = load_model(domain.specialist_dir, device=self.device, dtype=self.dtype)
        if tokenizer.get_vocab() != vocab:
            warnings.warn(
                f"{domain.specialist_dir} has a different vocabulary: no KL for {domain.name}",
                stacklevel=2,
            )
            return None
        rows: list[torch.Tensor] = [torch.empty(0)] * len(examples)
        desc = f"specialist {domain.name}"
        with _progress(len(examples), desc, self.progress) as bar:
            for index, logprobs in iter_response_logprobs(
                model,
                examples,
                pad=pad_id(tokenizer),
                batch_size=self.batch_size,
                on_batch=bar.update,
            ):
                rows[index] = logprobs
        del model
        return rows


def _ids_key(examples: list[Example]) -> int:
    return hash(tuple((tuple(e.prompt_ids), tuple(e.response_ids)) for e in examples))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rec", disable=not enabled, leave=False, delay=0.5)


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

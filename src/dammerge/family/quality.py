"""A quick quality check at the end of a family build: greedy answers on a few eval records.

It is not the evaluator (``dammerge evaluate`` scores full eval sets with NLL and KL); it is a
cheap sanity table stored in the manifest so that a user, a test or a benchmark sees at once
whether the specialists learned their domains (and the base did not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from dammerge.evaluate.metrics import score_record
from dammerge.templates import alpaca_prompt


def max_new_tokens_for(
    records: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerFast, slack: int = 8
) -> int:
    """Enough new tokens for the longest reference output, plus a little slack."""
    lengths = [len(tokenizer(r["output"])["input_ids"]) for r in records]
    return max(lengths, default=16) + slack


@torch.no_grad()
def greedy_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    records: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions of the records' Alpaca prompts (left-padded batches)."""
    tokenizer.padding_side = "left"
    responses: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in chunk]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        responses += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return responses


def score_domain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    records: Sequence[dict[str, Any]],
    metric: str,
) -> float:
    """Mean ``score_record`` of greedy responses over ``records`` (in [0, 1])."""
    if not records:
        return 0.0
    responses = greedy_responses(model, tokenizer, records, max_new_tokens_for(records, tokenizer))
    scores = [score_record(metric, text, r) for text, r in zip(responses, records, strict=True)]
    return sum(scores) / len(scores)

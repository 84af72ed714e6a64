"""A quick quality check at the end of a family build: greedy answers on a few eval records.

It is not the evaluator (``dammerge evaluate`` scores full eval sets with NLL and KL); it is a
cheap sanity table stored in the manifest so that a user, a test or a benchmark sees at once
whether the specialists learned their domains (and the base did not). It generates exactly as
the evaluator does (same prompts, stops and greedy settings), so the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerFast

from dammerge.data.examples import ALPACA_RECORDS, encode_prompt
from dammerge.scoring.generation import generate_responses
from dammerge.scoring.metrics import score_record


def max_new_tokens_for(
    records: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerFast, slack: int = 8
) -> int:
    """Enough new tokens for the longest reference output, plus a little slack."""
    lengths = [len(tokenizer(r["output"])["input_ids"]) for r in records]
    return max(lengths, default=16) + slack


def score_domain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    records: Sequence[dict[str, Any]],
    metric: str,
) -> float:
    """Mean ``score_record`` of greedy responses over ``records`` (in [0, 1])."""
    if not records:
        return 0.0
    responses = generate_responses(
        model,
        tokenizer,
        [encode_prompt(r, ALPACA_RECORDS, tokenizer) for r in records],
        max_new_tokens=max_new_tokens_for(records, tokenizer),
    )
    scores = [score_record(metric, text, r) for text, r in zip(responses, records, strict=True)]
    return sum(scores) / len(scores)

"""Prompt templates shared by the miniature family, the evaluator and learned merging.

The Alpaca template is the one the DAM paper trains and evaluates with; keeping a single
definition guarantees that specialists are fine-tuned, merged and scored on identical prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (everything before the response) for one example."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def record_prompt(record: Mapping[str, Any]) -> str:
    """The Alpaca prompt of a record with an ``instruction`` and an optional ``input``."""
    return alpaca_prompt(record["instruction"], record.get("input") or "")

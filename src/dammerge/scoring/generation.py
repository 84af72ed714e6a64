"""Greedy, batched generation for scoring, with the stops that lm-eval uses.

Batches are left-padded (so every row's next token comes from the same last column), sorted
by prompt length (little padding; longest first, so an out-of-memory error happens at once),
and each row stops at EOS or once its text contains the Alpaca section break ``"\\n### "``.
The generation config is built here, greedy and nothing else, so a model's own sampling
settings (temperature, repetition penalty) cannot make two merges incomparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from dammerge.data.examples import pad_id
from dammerge.scoring.metrics import SECTION_BREAK

DEFAULT_MAX_NEW_TOKENS = 128


class StopOnText(StoppingCriteria):
    """Marks a row finished once its generated text (decoded) contains a stop string.

    Decoding (rather than matching token strings) sees exactly the text that is scored,
    whatever the tokenizer; lm-eval's stop criterion works the same way. Only the last few
    tokens are decoded each step: every token holds at least one byte, so a stop string of
    b bytes completed by the newest token lies within its last b tokens, and ``generate``
    keeps a row finished once it was marked.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_width = prompt_width
        self.window = max((len(stop.encode()) for stop in self.stops), default=0) + 1

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:])
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return sorted(ids)


def context_limit(model: Any) -> int | None:
    """The model's maximum sequence length, if its config states one."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for ``rows``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def cut_at_eos(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The generated tokens before the first EOS (the rest is padding)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    stops: Sequence[str] = (SECTION_BREAK,),
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of tokenized ``prompts`` (decoded, in input order).

    A prompt too long for the model is cut from the left to leave room for
    ``max_new_tokens``, as lm-eval does. ``on_batch(n)`` reports progress.
    """
    device = next(model.parameters()).device
    stop_ids = eos_ids(model, tokenizer)
    limit = context_limit(model)
    room = None if limit is None else max(limit - max_new_tokens, 1)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id(tokenizer),
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [prompts[i][-room:] if room else prompts[i] for i in chunk]
        ids, mask = left_pad(rows, pad_id(tokenizer))
        criteria = StoppingCriteriaList([StopOnText(tokenizer, stops, ids.shape[1])])
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            stopping_criteria=criteria,
        )
        for index, row in zip(chunk, output[:, ids.shape[1] :].tolist(), strict=True):
            responses[index] = tokenizer.decode(cut_at_eos(row, stop_ids), skip_special_tokens=True)
        if on_batch is not None:
            on_batch(len(chunk))
    return responses

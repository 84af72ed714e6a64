"""Records as token ids: templating, tokenising, target masks, and padded batches.

One encoder serves every consumer: learned merging trains on the targets, evolutionary search
and the evaluator score the response tokens. Prompt and response are tokenised separately
(the response ends with EOS), so the response tokens are exactly those a model generating
after the prompt has to produce. Examples are truncated to ``max_length`` but never padded;
:func:`collate` pads a batch to its longest member.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from dammerge.data.spec import FIELDS, DatasetSpec
from dammerge.errors import DammergeError
from dammerge.templates import record_prompt

# How to read records already in memory whose fields are named instruction / input / output (a
# family's splits): the Alpaca template, no field mapping. There is no file behind it.
ALPACA_RECORDS = DatasetSpec(path="<records in memory>")


@dataclass(frozen=True)
class Example:
    """One tokenised record: token ids, and which of them are targets.

    A target is a token the model learns (or is scored) to predict: the response, and with
    ``loss_on: all`` the prompt as well. The response starts at the first target, so
    :attr:`prompt_ids` and :attr:`response_ids` split the ids there.
    """

    input_ids: list[int]
    target_mask: list[bool]

    @classmethod
    def from_parts(
        cls,
        prompt_ids: list[int],
        response_ids: list[int],
        *,
        prompt_is_target: bool = False,
        max_length: int | None = None,
    ) -> Example:
        """Prompt then response, cut to the first ``max_length`` tokens (None: no limit)."""
        ids = (prompt_ids + response_ids)[:max_length]
        targets = [prompt_is_target] * len(prompt_ids) + [True] * len(response_ids)
        return cls(ids, targets[:max_length])

    @property
    def response_start(self) -> int:
        """Index of the first target token (the length when there is none)."""
        return next((i for i, target in enumerate(self.target_mask) if target), len(self))

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.response_start]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start :]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    """A right-padded batch. ``loss_mask[b, t]`` marks positions t whose *next* token is a target.

    ``indices`` are the examples' positions in the list they came from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    indices: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            self.indices,
        )

    @property
    def tokens(self) -> int:
        """Real (not padding) tokens in the batch."""
        return int(self.attention_mask.sum())


def pad_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS, then 0 (many causal LMs ship without a pad token)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _text(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    return "" if value is None else str(value)


def _texts(record: dict[str, Any], spec: DatasetSpec) -> dict[str, str]:
    """The record's text of each field the template reads (missing optional ones are empty)."""
    return {name: _text(record, spec.column(name)) for name in FIELDS[spec.template]}


def _chat_user(texts: dict[str, str]) -> dict[str, str]:
    extra = texts["input"]
    content = f"{texts['instruction']}\n\n{extra}" if extra else texts["instruction"]
    return {"role": "user", "content": content}


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    if hasattr(ids, "keys"):  # transformers may hand back a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_prompt(record: dict[str, Any], spec: DatasetSpec, tokenizer: Any) -> list[int]:
    """The prompt ids of a record: what a model reads before it answers (empty for ``raw``)."""
    if spec.template == "raw":
        return []
    texts = _texts(record, spec)
    if spec.template == "alpaca":
        return list(tokenizer(record_prompt(texts))["input_ids"])
    return _chat_ids(tokenizer, [_chat_user(texts)], generation=True)


def _response_ids(
    record: dict[str, Any], spec: DatasetSpec, tokenizer: Any, prompt: list[int]
) -> list[int]:
    texts = _texts(record, spec)
    if spec.template == "raw":
        return list(tokenizer(texts["text"])["input_ids"]) + _eos(tokenizer)
    if spec.template == "chat":
        reply = {"role": "assistant", "content": texts["output"]}
        full = _chat_ids(tokenizer, [_chat_user(texts), reply], generation=False)
        if full[: len(prompt)] == prompt:  # the template's own end-of-turn tokens included
            return full[len(prompt) :]
    return list(tokenizer(texts["output"], add_special_tokens=False)["input_ids"]) + _eos(tokenizer)


def encode_record(
    record: dict[str, Any],
    spec: DatasetSpec,
    tokenizer: Any,
    *,
    loss_on: str = "response",
    max_length: int | None = None,
) -> Example:
    """Template and tokenise one record; the response ends with EOS.

    ``loss_on="all"`` makes the prompt tokens targets too; ``max_length`` keeps the first
    tokens only.
    """
    prompt = encode_prompt(record, spec, tokenizer)
    response = _response_ids(record, spec, tokenizer, prompt)
    return Example.from_parts(
        prompt, response, prompt_is_target=loss_on == "all", max_length=max_length
    )


def encode_dataset(
    records: Iterable[dict[str, Any]],
    spec: DatasetSpec,
    tokenizer: Any,
    *,
    loss_on: str,
    max_length: int,
    where: str,
) -> list[Example]:
    """Every record encoded; records left with no target token (all truncated) are dropped."""
    if spec.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DammergeError(
            f"{where}: template: chat, but the tokenizer has no chat template",
            "use template: alpaca or raw, or a tokenizer with a chat_template",
        )
    examples = []
    for record in records:
        example = encode_record(record, spec, tokenizer, loss_on=loss_on, max_length=max_length)
        if any(example.target_mask[1:]):  # the first token is never predicted
            examples.append(example)
    if not examples:
        raise DammergeError(
            f"{where}: no example of {spec.path} keeps a target token within "
            f"max_length={max_length}",
            "raise training.max_length"
            + (" or use loss_on: all" if loss_on == "response" and spec.template != "raw" else ""),
        )
    return examples


def collate(examples: list[Example], indices: list[int], pad_id: int) -> Batch:
    """Right-pad to the longest example (dynamic padding)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    loss = torch.zeros((len(examples), length), dtype=torch.bool)
    for b, example in enumerate(examples):
        n = len(example.input_ids)
        ids[b, :n] = torch.tensor(example.input_ids)
        attention[b, :n] = 1
        # position t predicts token t + 1: it counts when that token is a target
        loss[b, : n - 1] = torch.tensor(example.target_mask[1:], dtype=torch.bool)
    return Batch(ids, attention, loss, indices)

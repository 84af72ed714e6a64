"""Representative datasets: loading, templating, tokenising, ordering and batching.

Each source model names its own data (local JSONL, JSON, CSV, Parquet, or a
``datasets.save_to_disk`` folder), read with the ``datasets`` library. Records become token ids
with a per-token *loss mask* (all tokens, or only the response), truncated but never padded to a
fixed length: batches are padded dynamically to their longest member (with batch size 1, the
paper's default, there is no padding at all; the reference code padded everything to 2,048).

The order in which examples are visited is a pure function of (seed, source, step): resuming at
step k needs no iterator state, only k, and reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dammerge.errors import DammergeError
from dammerge.learned.settings import FIELDS, OPTIONAL_FIELDS, DatasetSettings
from dammerge.templates import alpaca_prompt

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Example:
    """One tokenised example: ids, and which tokens are training targets."""

    input_ids: list[int]
    target_mask: list[bool]


@dataclass
class Batch:
    """A padded batch. ``loss_mask[b, t]`` marks positions t whose *next* token is a target."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    indices: list[int]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            self.indices,
        )


def load_records(settings: DatasetSettings, cache_dir: Path | None = None):
    """The dataset of ``settings.path`` as a ``datasets.Dataset`` (one split)."""
    import datasets

    path = Path(settings.path).expanduser()
    if not path.exists():
        raise DammergeError(
            f"dataset not found: {path}",
            "datasets are local files (JSONL, JSON, CSV, Parquet) or save_to_disk folders",
        )
    if path.is_file() and path.stat().st_size == 0:
        raise DammergeError(f"dataset {path} is empty", "point at a file with records")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if settings.split not in loaded:
                    raise DammergeError(
                        f"dataset {path} has no split {settings.split!r}",
                        f"its splits: {', '.join(loaded)}; set dataset.split",
                    )
                loaded = loaded[settings.split]
            return loaded
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise DammergeError(
                f"cannot tell the format of dataset {path}",
                f"use one of {', '.join(FORMATS)} or a save_to_disk folder",
            )
        return datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=str(cache_dir) if cache_dir else None,
        )
    except DammergeError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(exc):  # e.g. a CSV with only its header
            raise DammergeError(
                f"dataset {path} is empty", "point at a file with records"
            ) from None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DammergeError(f"cannot read dataset {path}: {text}") from None


def check_columns(settings: DatasetSettings, columns: list[str], where: str) -> None:
    """Every mapped field must be a column (a one-line error names what is missing)."""
    for field in FIELDS[settings.template]:
        column = settings.column(field)
        if column in columns:
            continue
        if field in OPTIONAL_FIELDS and field not in settings.fields:
            continue  # 'input' is optional unless mapped explicitly
        raise DammergeError(
            f"{where}: dataset {settings.path} has no column {column!r} (field {field})",
            f"its columns: {', '.join(columns) or 'none'}; map it with fields: {{{field}: COLUMN}}",
        )


def select_records(dataset: Any, settings: DatasetSettings, seed: int, where: str) -> Any:
    """A seeded random subset of ``samples`` records (all of them when not set)."""
    if len(dataset) == 0:
        raise DammergeError(f"{where}: dataset {settings.path} is empty", "point at real data")
    if settings.samples is None:
        return dataset
    if settings.samples > len(dataset):
        warnings.warn(
            f"{where}: {settings.samples} samples asked but {settings.path} holds "
            f"{len(dataset)}; using all of them",
            stacklevel=2,
        )
        return dataset
    return dataset.shuffle(seed=seed).select(range(settings.samples))


def _text(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    return "" if value is None else str(value)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    if hasattr(ids, "keys"):  # transformers may hand back a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_record(
    record: dict[str, Any],
    settings: DatasetSettings,
    tokenizer: Any,
    *,
    loss_on: str,
    max_length: int,
) -> Example:
    """Template and tokenise one record; the response ends with EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if settings.template == "raw":
        prompt: list[int] = []
        response = tokenizer(_text(record, settings.column("text")))["input_ids"] + eos
    else:
        instruction = _text(record, settings.column("instruction"))
        extra = _text(record, settings.column("input"))
        output = _text(record, settings.column("output"))
        if settings.template == "alpaca":
            prompt = tokenizer(alpaca_prompt(instruction, extra))["input_ids"]
            response = tokenizer(output, add_special_tokens=False)["input_ids"] + eos
        else:
            content = f"{instruction}\n\n{extra}" if extra else instruction
            user = {"role": "user", "content": content}
            prompt = _chat_ids(tokenizer, [user], generation=True)
            full = _chat_ids(tokenizer, [user, {"role": "assistant", "content": output}], False)
            if full[: len(prompt)] == prompt:
                response = full[len(prompt) :]
            else:
                response = tokenizer(output, add_special_tokens=False)["input_ids"] + eos
    ids = (prompt + response)[:max_length]
    targets = ([loss_on == "all"] * len(prompt) + [True] * len(response))[:max_length]
    return Example(ids, targets)


def encode_dataset(
    dataset: Any,
    settings: DatasetSettings,
    tokenizer: Any,
    *,
    loss_on: str,
    max_length: int,
    where: str,
) -> list[Example]:
    """Every record encoded; records left with no target token (all truncated) are dropped."""
    if settings.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DammergeError(
            f"{where}: template: chat, but the tokenizer has no chat template",
            "use template: alpaca or raw, or a tokenizer with a chat_template",
        )
    examples = []
    for record in dataset:
        example = encode_record(record, settings, tokenizer, loss_on=loss_on, max_length=max_length)
        if any(example.target_mask[1:]):
            examples.append(example)
    if not examples:
        raise DammergeError(
            f"{where}: no example of {settings.path} keeps a target token within "
            f"max_length={max_length}",
            "raise training.max_length or use loss_on: all",
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


class SourceData:
    """The encoded examples of one source and their deterministic visiting order."""

    def __init__(
        self, examples: list[Example], *, seed: int, source: int, batch_size: int, pad_id: int
    ) -> None:
        self.examples = examples
        self.seed, self.source = seed, source
        self.batch_size, self.pad_id = batch_size, pad_id
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.source * 10_007 + epoch) % (2**63 - 1)
            )
            self._orders = {epoch: torch.randperm(len(self), generator=generator).tolist()}
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """Example indices of ``step``'s batch (a fresh shuffle every pass over the data)."""
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, position = divmod(k, len(self))
            out.append(self._order(epoch)[position])
        return out

    def batch(self, step: int) -> Batch:
        indices = self.indices(step)
        return collate([self.examples[i] for i in indices], indices, self.pad_id)

    def token_count(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(json.dumps([example.input_ids, example.target_mask]).encode())
        return digest.hexdigest()

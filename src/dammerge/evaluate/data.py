"""The evaluation's inputs: a family's eval records per domain, checked, and tokenized examples.

Everything here runs before any model is loaded, so a bad family (missing file, a record
without its ``answer``) fails in a second with one line, not after an hour of generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dammerge.errors import DammergeError
from dammerge.evaluate.metrics import METRICS
from dammerge.family.manifest import Family, read_jsonl
from dammerge.templates import alpaca_prompt

COMPOSITIONAL = "compositional"
SPLITS = ("eval", "train")

# Fields each metric needs beyond the common ones (see the family contract).
_METRIC_FIELDS = {"exact_match": ("answer",), "execution": ("context",), "translation": ()}
_COMMON_FIELDS = ("instruction", "output")


@dataclass(frozen=True)
class DomainData:
    """One domain's records for one split, with the metric that scores them."""

    name: str
    metric: str
    records: list[dict[str, Any]]
    specialist_dir: Path | None  # None: no specialist (compositional), so no KL


@dataclass(frozen=True)
class Example:
    """One record tokenized as the model sees it: prompt ids, then response ids ending in EOS."""

    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def record_prompt(record: dict[str, Any]) -> str:
    """The Alpaca prompt of an eval record (the text the model continues)."""
    return alpaca_prompt(record["instruction"], record.get("input", "") or "")


def _check_records(records: list[dict[str, Any]], metric: str, path: Path) -> None:
    if not records:
        raise DammergeError(f"{path} holds no records", "rebuild the family")
    needed = _COMMON_FIELDS + _METRIC_FIELDS[metric]
    for number, record in enumerate(records, 1):
        missing = [name for name in needed if name not in record]
        if missing:
            raise DammergeError(
                f"record {number} of {path} lacks {', '.join(missing)} (needed by {metric})",
                "docs/family-format.md lists the fields each metric needs",
            )


def _load_domain(
    name: str, metric: str, path: Path, specialist: Path | None, limit: int | None
) -> DomainData:
    if metric not in METRICS:
        raise DammergeError(
            f"domain {name!r} names unknown metric {metric!r}", f"use one of {', '.join(METRICS)}"
        )
    if not path.is_file():
        raise DammergeError(f"{path} does not exist", "rebuild the family")
    records = read_jsonl(path)[:limit]
    _check_records(records, metric, path)
    return DomainData(name=name, metric=metric, records=records, specialist_dir=specialist)


def load_domains(
    family: Family,
    *,
    split: str = "eval",
    limit: int | None = None,
    domains: list[str] | None = None,
    compositional: bool = True,
) -> dict[str, DomainData]:
    """The family's records per domain (first ``limit`` of each), compositional last.

    ``domains`` picks domains by name ("compositional" included only if named); by default
    all specialist domains, plus the compositional set unless ``compositional=False``.
    ``split="train"`` gives the training records (evolution scores candidates on a held-in
    subset); the compositional set has no training split and is then left out.
    """
    if split not in SPLITS:
        raise DammergeError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise DammergeError(f"--limit must be at least 1, got {limit}")
    wanted = list(family.domains) if domains is None else domains
    known = [*family.domains, *([COMPOSITIONAL] if family.compositional else [])]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise DammergeError(
            f"family {family.root} has no domain {', '.join(map(repr, unknown))}",
            f"known domains: {', '.join(known)}",
        )
    result = {}
    for name in wanted:
        if name == COMPOSITIONAL:
            continue
        spec = family.domains[name]
        path = spec.eval if split == "eval" else spec.train
        result[name] = _load_domain(name, spec.metric, path, spec.specialist_dir, limit)
    include_comp = COMPOSITIONAL in wanted if domains is not None else compositional
    if include_comp and family.compositional is not None and split == "eval":
        spec = family.compositional
        result[COMPOSITIONAL] = _load_domain(COMPOSITIONAL, spec.metric, spec.eval, None, limit)
    return result


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id; a tokenizer without one cannot mark a response end."""
    if tokenizer.eos_token_id is None:
        raise DammergeError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no EOS token",
            "set eos_token in its tokenizer_config.json",
        )
    return int(tokenizer.eos_token_id)


def encode_prompt(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (a BOS if it adds one), as in training."""
    return list(tokenizer(record_prompt(record))["input_ids"])


def encode_example(tokenizer: Any, record: dict[str, Any]) -> Example:
    """Prompt ids, then the reference response's ids and EOS (the training target).

    Prompt and response are tokenized separately, so the response tokens are exactly the
    ones a model generating after this prompt would have to produce.
    """
    response = list(tokenizer(record["output"], add_special_tokens=False)["input_ids"])
    return Example(encode_prompt(tokenizer, record), [*response, eos_token_id(tokenizer)])

"""The evaluation's inputs: a family's eval records per domain, checked, and tokenized.

Everything here runs before any model is loaded, so a bad family (missing file, a record
without its ``answer``) fails in a second with one line, not after an hour of generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dammerge.data.examples import ALPACA_RECORDS, Example, encode_prompt, encode_record
from dammerge.data.records import read_jsonl
from dammerge.data.tokenizer import eos_token_id
from dammerge.errors import DammergeError
from dammerge.family.manifest import Family
from dammerge.scoring.metrics import METRICS

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


def encode_prompts(tokenizer: Any, records: list[dict[str, Any]]) -> list[list[int]]:
    """Each record's Alpaca prompt ids (with a BOS if the tokenizer adds one), as in training."""
    return [encode_prompt(record, ALPACA_RECORDS, tokenizer) for record in records]


def encode_examples(tokenizer: Any, records: list[dict[str, Any]]) -> list[Example]:
    """Each record's prompt, then its reference response and EOS (the training target).

    Prompt and response are tokenized separately, so the response tokens are exactly the
    ones a model generating after this prompt would have to produce.
    """
    eos_token_id(tokenizer)  # a reference response must end
    return [encode_record(record, ALPACA_RECORDS, tokenizer) for record in records]

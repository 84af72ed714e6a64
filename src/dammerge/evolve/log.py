"""The evaluation log: one JSON line per fitness evaluation, the search's only memory.

Every scored candidate is appended (and flushed to disk) at once, so a killed search loses at
most the evaluation in flight. Resuming replays the log into a fresh CMA-ES: candidates the log
already holds are told their logged score instead of being recomputed, which makes a resumed
search identical to an uninterrupted one. The first line is a header with a fingerprint of the
search (models, method, search space, settings, seed); a log of a different search is never
replayed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dammerge.errors import DammergeError

FORMAT = "dammerge-evolve-log/1"
FAILED_LOSS = 1e12  # what CMA-ES is told for a candidate that could not be merged or scored


@dataclass
class EvalRecord:
    """One fitness evaluation."""

    generation: int
    index: int
    evaluation: int
    x: list[float]
    params: dict[str, float]
    fitness: float | None
    seconds: float
    sequences: int = 0
    tokens: int = 0
    error: str | None = None

    @property
    def loss(self) -> float:
        """What CMA-ES minimises: minus the fitness (a large constant for failures)."""
        return FAILED_LOSS if self.fitness is None else -self.fitness


class EvolveLog:
    """Append-only JSONL log of one search."""

    def __init__(self, path: Path, fingerprint: str, records: list[EvalRecord]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.records = records
        self._by_slot = {(r.generation, r.index): r for r in records}

    @staticmethod
    def check(path: Path, fingerprint: str, *, restart: bool) -> None:
        """Refuse, before any compute, to continue the log of a different search."""
        if path.is_file() and not restart:
            header, _ = _read(path)
            if header.get("fingerprint") != fingerprint:
                raise _different_search(path)

    @classmethod
    def open(cls, path: Path, fingerprint: str, *, restart: bool) -> EvolveLog:
        """Read the log at ``path`` if it belongs to this search, else start a new one.

        A log of another search is an error unless ``restart`` (then it is replaced).
        """
        records: list[EvalRecord] = []
        if path.is_file():
            header, records = _read(path)
            if header.get("fingerprint") != fingerprint:
                if not restart:
                    raise _different_search(path)
                records = []
        if not records:
            path.parent.mkdir(parents=True, exist_ok=True)
            header = {"kind": "header", "format": FORMAT, "fingerprint": fingerprint}
            path.write_text(json.dumps(header) + "\n")
        else:
            _rewrite_clean(path, records, fingerprint)
        return cls(path, fingerprint, records)

    def get(self, generation: int, index: int) -> EvalRecord | None:
        return self._by_slot.get((generation, index))

    def append(self, record: EvalRecord) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)
        self._by_slot[(record.generation, record.index)] = record


def _different_search(path: Path) -> DammergeError:
    return DammergeError(
        f"{path} holds the log of a different search (recipe, models, seed or settings changed)",
        "pass --overwrite to start the search again, or restore the recipe",
    )


def _read(path: Path) -> tuple[dict[str, Any], list[EvalRecord]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    records = []
    for number, line in enumerate(lines[1:], 2):
        try:
            data = json.loads(line)
            records.append(EvalRecord(**data))
        except (json.JSONDecodeError, TypeError):
            if number == len(lines):  # the last line was being written when the run died
                break
            raise DammergeError(
                f"{path}:{number} is not a valid evaluation record",
                "the log is corrupt; pass --overwrite to start the search again",
            ) from None
    return header, records


def _rewrite_clean(path: Path, records: list[EvalRecord], fingerprint: str) -> None:
    """Drop a torn last line so that appends start on a fresh line."""
    header = {"kind": "header", "format": FORMAT, "fingerprint": fingerprint}
    text = "".join(json.dumps(x) + "\n" for x in [header, *(asdict(r) for r in records)])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

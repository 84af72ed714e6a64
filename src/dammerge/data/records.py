"""Reading a dataset's records: formats, field checks, the seeded subset, and JSONL helpers.

A :class:`~dammerge.data.spec.DatasetSpec` names local JSONL, JSON, CSV or Parquet files, or a
``datasets.save_to_disk`` folder; all are read with the ``datasets`` library into one split.
Records are checked before anything is tokenised: every field the template reads must be a
column, and every record must hold a text for each required field, so a bad file fails with
one line naming the column or the record.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dammerge.data.spec import FIELDS, OPTIONAL_FIELDS, DatasetSpec
from dammerge.errors import DammergeError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(spec: DatasetSpec, cache_dir: Path | None = None, *, where: str | None = None):
    """The dataset of ``spec.path`` as a ``datasets.Dataset`` (one split).

    ``cache_dir`` receives the Arrow files that ``datasets`` builds from plain files (its own
    cache when None); ``where`` names the dataset's owner in errors ("model ./math").
    """
    import datasets

    path = Path(spec.path).expanduser()
    if not path.exists():
        owner = f" of {where}" if where else ""
        raise DammergeError(
            f"dataset{owner} not found: {path}",
            "datasets are local files (JSONL, JSON, CSV, Parquet) or save_to_disk folders",
        )
    if path.is_file() and path.stat().st_size == 0:
        raise DammergeError(f"dataset {path} is empty", "point at a file with records")
    datasets.disable_progress_bars()
    try:
        with _datasets_log_silenced():
            if path.is_dir():
                return _load_saved(path, spec.split)
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
        raise _unreadable(path, exc) from None


@contextmanager
def _datasets_log_silenced() -> Iterator[None]:
    """``datasets`` logs its own error line before raising (e.g. "Failed to load JSON ... row
    0"); ours names the file and line instead, so its log is muted while it reads."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreadable(path: Path, exc: BaseException) -> DammergeError:
    """A one-line error for a file ``datasets`` could not read: where a JSON file stops
    parsing (line, column, cause), else the innermost cause ``datasets`` wrapped."""
    if "corresponds to no data" in str(exc):  # e.g. a CSV with only its header
        return DammergeError(f"dataset {path} is empty", "point at a file with records")
    if FORMATS.get(path.suffix.lower()) == "json":
        located = json_syntax_error(path)
        if located is not None:
            return DammergeError(f"dataset {located}", "fix the record, or remove that line")
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # datasets wraps the reader's own error
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DammergeError(f"cannot read dataset {path}: {text}")


def json_syntax_error(path: Path) -> str | None:
    """Where a JSON or JSON Lines file stops being valid: ``PATH: line L, column C: cause``
    (None when it parses). One JSON document, or one object per line, as ``datasets`` reads."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": JSON Lines in a .json file
                return f"{path}: line {exc.lineno}, column {exc.colno}: {exc.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{path}: line {number}, column {exc.colno}: {exc.msg}"
        if not isinstance(record, dict):
            kind = type(record).__name__
            return f"{path}: line {number}: a record must be a JSON object, not a {kind}"
    return None


def _load_saved(path: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DammergeError(
                f"dataset {path} has no split {split!r}",
                f"its splits: {', '.join(loaded)}; set dataset.split",
            )
        loaded = loaded[split]
    return loaded


def check_columns(spec: DatasetSpec, columns: list[str], where: str) -> None:
    """Every mapped field must be a column (a one-line error names what is missing)."""
    for field in FIELDS[spec.template]:
        column = spec.column(field)
        if column in columns:
            continue
        if field in OPTIONAL_FIELDS and field not in spec.fields:
            continue  # 'input' is optional unless mapped explicitly
        raise DammergeError(
            f"{where}: dataset {spec.path} has no column {column!r} (field {field})",
            f"its columns: {', '.join(columns) or 'none'}; map it with fields: {{{field}: COLUMN}}",
        )


def check_texts(dataset: Any, spec: DatasetSpec, where: str) -> None:
    """Every record must hold a value for each required field (the first gap is named).

    Records are numbered from 1 in file order. Reads the Arrow columns, not Python rows.
    """
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    for field in spec.required_fields():
        column = table[spec.column(field)]
        if column.null_count:
            number = pc.index(pc.is_null(column), True).as_py() + 1
            raise DammergeError(
                f"{where}: dataset {spec.path}: record {number} has no text field "
                f"{spec.column(field)!r}",
                f"every record needs its {field}; map another column with fields: "
                f"{{{field}: COLUMN}}",
            )


@contextmanager
def opened_records(spec: DatasetSpec, *, where: str) -> Iterator[Any]:
    """The checked records of ``spec`` as a ``datasets.Dataset``, readable inside the block.

    ``datasets`` converts plain files into Arrow files; they go to a temporary folder removed
    on leaving the block, so a merge leaves nothing in the user's cache.
    """
    with tempfile.TemporaryDirectory(prefix="dammerge-datasets-") as cache:
        records = load_records(spec, Path(cache), where=where)
        check_columns(spec, list(records.column_names), where)
        if len(records) == 0:
            raise DammergeError(f"{where}: dataset {spec.path} is empty", "point at real data")
        check_texts(records, spec, where)
        yield records


def select_records(dataset: Any, spec: DatasetSpec, seed: int, where: str) -> Any:
    """A seeded random subset of ``samples`` records (all of them when not set)."""
    if spec.samples is None:
        return dataset
    if spec.samples > len(dataset):
        warnings.warn(
            f"{where}: {spec.samples} samples asked but {spec.path} holds "
            f"{len(dataset)}; using all of them",
            stacklevel=2,
        )
        return dataset
    return dataset.shuffle(seed=seed).select(range(spec.samples))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (blank lines skipped), with a clear error on bad JSON."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DammergeError(
                    f"{path}:{number} is not valid JSON ({exc.msg})", "fix or regenerate the file"
                ) from None
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8 text kept as is), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

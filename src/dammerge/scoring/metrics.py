"""Text metrics of the per-domain evaluation: maths exact match, SQL execution, chrF.

Each metric is a small pure function of one generated response and one reference record, so it
can be tested on hand-made cases and reused elsewhere (evolutionary fitness, the experiment
runner).

This module deliberately imports nothing but the standard library and ``sacrebleu``: the
lm-evaluation-harness bridge copies its source verbatim into the exported ``utils.py``, so
``lm_eval`` scores a merge with exactly the code that ``dammerge evaluate`` uses, even where
``dammerge`` is not installed. Token-level metrics (NLL, KL) live in ``likelihood.py``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Any

# A number as people write it in an answer: optional sign, digits with optional thousands
# separators, optional decimals ("-1,234.50"). Also used by the lm-eval regex filter.
NUMBER_PATTERN = r"-?\d[\d,]*(?:\.\d+)?"
_NUMBER = re.compile(NUMBER_PATTERN)
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)

# A response ends at EOS, or where the model starts a new Alpaca section on its own.
SECTION_BREAK = "\n### "

SQL_TIMEOUT_SECONDS = 2.0
SQL_MAX_ROWS = 100_000


def truncate_response(text: str) -> str:
    """Cut a generated response where a new Alpaca section starts, and strip it.

    Models that never learned to emit EOS (an untuned base) run on into a made-up next
    instruction; its numbers or SQL must not be scored as the answer.
    """
    return text.split(SECTION_BREAK, 1)[0].strip()


# --------------------------------------------------------------------------- maths


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (thousands separators removed), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def _as_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").strip())
    except (InvalidOperation, ValueError):
        return None


def math_exact_match(response: str, answer: str) -> float:
    """1.0 if the last number in ``response`` equals ``answer`` numerically, else 0.0.

    Numeric (not string) comparison, so "42.0" and "42" agree; "41" does not.
    """
    found = last_number(response)
    if found is None:
        return 0.0
    got, want = _as_decimal(found), _as_decimal(answer)
    return float(got is not None and want is not None and got == want)


# --------------------------------------------------------------------------- SQL


def extract_sql(response: str) -> str:
    """The first SQL statement of a response: text up to the first ';', stripped."""
    return response.split(";", 1)[0].strip()


def _read_only(action: int, *_args: Any) -> int:
    """sqlite3 authorizer: allow reading only (no writes, ATTACH, PRAGMA...)."""
    allowed = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
    recursive = getattr(sqlite3, "SQLITE_RECURSIVE", None)
    if recursive is not None:
        allowed.add(recursive)
    return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY


def build_database(context: str) -> sqlite3.Connection:
    """A fresh in-memory database built from a record's ``context`` statements.

    Once built, the connection is made read-only (an authorizer) so that generated SQL can
    neither modify the tables it is scored on nor touch the file system (ATTACH).
    """
    conn = sqlite3.connect(":memory:")
    conn.executescript(context)
    conn.set_authorizer(_read_only)
    return conn


def _normalise_row(row: tuple) -> tuple:
    """Round floats so that 0.1 + 0.2 and 0.3 compare equal; leave other values alone."""
    return tuple(round(v, 6) if isinstance(v, float) else v for v in row)


def run_query(
    conn: sqlite3.Connection,
    sql: str,
    *,
    timeout: float = SQL_TIMEOUT_SECONDS,
    max_rows: int = SQL_MAX_ROWS,
) -> list[tuple]:
    """Execute one statement and return its rows; raise ``sqlite3.Error`` on any failure.

    A progress handler aborts the query after ``timeout`` seconds (a generated cross join can
    run for ever), and more than ``max_rows`` rows count as a failure.
    """
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    try:
        cursor = conn.execute(sql)
        rows = cursor.fetchmany(max_rows + 1)
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        raise sqlite3.OperationalError(f"query returned more than {max_rows} rows")
    return [_normalise_row(tuple(r)) for r in rows]


def sql_execution_match(
    response: str, gold: str, context: str, *, timeout: float = SQL_TIMEOUT_SECONDS
) -> float:
    """1.0 if the generated SQL returns the gold query's rows on the record's database.

    Rows are compared as multisets, or as sequences when the gold query has ORDER BY.
    Any error (syntax, unknown column, timeout, a write attempt) scores 0.0.
    """
    predicted = extract_sql(response)
    if not predicted:
        return 0.0
    try:
        conn = build_database(context)
    except sqlite3.Error:
        return 0.0
    try:
        want = run_query(conn, extract_sql(gold), timeout=timeout)
        got = run_query(conn, predicted, timeout=timeout)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return 0.0
    finally:
        conn.close()
    if _ORDER_BY.search(gold):
        return float(got == want)
    return float(Counter(got) == Counter(want))


# --------------------------------------------------------------------------- translation


def chrf(response: str, reference: str) -> float:
    """Sentence chrF in [0, 1]: character n-grams n = 1..6, beta = 2 (sacrebleu's CHRF / 100).

    We use sacrebleu (a dependency of lm-eval, pinned by us) rather than our own copy, so
    that the number is the one translation papers report.
    """
    from sacrebleu.metrics import CHRF

    scorer = CHRF(char_order=6, word_order=0, beta=2)
    return scorer.sentence_score(response, [reference]).score / 100


# --------------------------------------------------------------------------- dispatch

METRICS = ("exact_match", "execution", "translation")


def score_record(metric: str, response: str, record: dict[str, Any]) -> float:
    """Score one response against one eval record with the named metric (in [0, 1])."""
    response = truncate_response(response)
    if metric == "exact_match":
        return math_exact_match(response, str(record["answer"]))
    if metric == "execution":
        return sql_execution_match(response, record["output"], record.get("context", ""))
    if metric == "translation":
        return chrf(response, record["output"])
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")

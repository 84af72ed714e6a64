"""The text metrics on hand-made cases whose right answer is known."""

from __future__ import annotations

import pytest
from sacrebleu.metrics import CHRF

from dammerge.scoring.metrics import (
    build_database,
    chrf,
    last_number,
    math_exact_match,
    run_query,
    score_record,
    sql_execution_match,
    truncate_response,
)

CONTEXT = (
    "CREATE TABLE people (name TEXT, age INTEGER, city TEXT);"
    "INSERT INTO people VALUES ('ann', 31, 'oslo'), ('bob', 25, 'rome'), ('cid', 40, 'oslo');"
)
GOLD = "SELECT name FROM people WHERE age > 30"


def test_known_correct_sql_executes_to_the_right_rows_and_scores_one():
    conn = build_database(CONTEXT)
    assert sorted(run_query(conn, GOLD)) == [("ann",), ("cid",)]
    assert sql_execution_match(GOLD, GOLD, CONTEXT) == 1.0
    assert sql_execution_match(GOLD + "; SELECT 1", GOLD, CONTEXT) == 1.0  # first statement only


def test_different_query_with_the_same_rows_scores_one():
    other = "SELECT name FROM people WHERE city = 'oslo'"
    assert sql_execution_match(other, GOLD, CONTEXT) == 1.0
    reordered = "SELECT name FROM people WHERE age >= 31 ORDER BY name DESC"
    assert sql_execution_match(reordered, GOLD, CONTEXT) == 1.0  # gold has no ORDER BY


@pytest.mark.parametrize(
    "wrong",
    [
        "SELECT name FROM people WHERE age > 20",  # extra row
        "SELECT name, age FROM people WHERE age > 30",  # extra column
        "SELECT nme FROM people",  # unknown column
        "SELEKT name FROM people",  # syntax error
        "",  # nothing generated
        "DROP TABLE people",  # a write is refused, not executed
    ],
)
def test_wrong_sql_scores_zero(wrong):
    assert sql_execution_match(wrong, GOLD, CONTEXT) == 0.0


def test_order_by_in_gold_makes_row_order_matter():
    gold = "SELECT name FROM people ORDER BY age"
    assert sql_execution_match("SELECT name FROM people ORDER BY age ASC", gold, CONTEXT) == 1.0
    assert sql_execution_match("SELECT name FROM people ORDER BY age DESC", gold, CONTEXT) == 0.0


def test_duplicate_rows_count():
    gold = "SELECT city FROM people"  # oslo twice
    assert sql_execution_match("SELECT DISTINCT city FROM people", gold, CONTEXT) == 0.0


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("so she has 42 apples. The answer is 42", "42", 1.0),
        ("The answer is 41", "42", 0.0),  # off by one
        ("The answer is 43", "42", 0.0),
        ("The answer is 42.0", "42", 1.0),  # numeric, not string, comparison
        ("42", "42.0", 1.0),
        ("Total: 1,234", "1234", 1.0),
        ("it is -5", "-5", 1.0),
        ("it is 5", "-5", 0.0),
        ("no number at all", "42", 0.0),
        ("42 first, then the answer is 7", "42", 0.0),  # the LAST number is the answer
    ],
)
def test_math_exact_match(response, answer, expected):
    assert math_exact_match(response, answer) == expected


def test_last_number():
    assert last_number("3 apples and 1,250.50 coins.") == "1250.50"
    assert last_number("none") is None


def test_chrf_identical_is_one_and_matches_sacrebleu():
    assert chrf("vela sun katoru", "vela sun katoru") == pytest.approx(1.0)
    assert chrf("zzzz", "vela sun katoru") == pytest.approx(0.0, abs=1e-9)
    hyp, ref = "vela sin katora", "vela sun katoru"
    reference = CHRF(char_order=6, word_order=0, beta=2).sentence_score(hyp, [ref]).score / 100
    assert chrf(hyp, ref) == pytest.approx(reference)
    assert 0.0 < chrf(hyp, ref) < 1.0


def test_a_response_is_cut_where_the_model_starts_a_new_section():
    text = " The answer is 7\n### Instruction:\nAdd 1 and 98. The answer is 99"
    assert truncate_response(text) == "The answer is 7"
    assert score_record("exact_match", text, {"answer": "7"}) == 1.0
    assert score_record("exact_match", text, {"answer": "99"}) == 0.0


def test_score_record_dispatches_on_the_metric_name():
    assert score_record("execution", GOLD, {"output": GOLD, "context": CONTEXT}) == 1.0
    assert score_record("translation", "a b", {"output": "a b"}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        score_record("bleu", "a", {"output": "a"})

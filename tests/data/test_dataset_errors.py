"""A dataset file that cannot be read fails with one line naming the file, the line and the
cause, and nothing from ``datasets`` reaches the terminal before it."""

from __future__ import annotations

import json

import pytest

from dammerge.data.records import json_syntax_error, load_records
from dammerge.data.spec import DatasetSpec
from dammerge.errors import DammergeError

GOOD = '{"instruction": "a", "output": "b"}'


def reference_position(line_text: str) -> tuple[int, str]:
    """Python's own json parser on the bad line alone: (column, cause)."""
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads(line_text)
    return info.value.colno, info.value.msg


def load_error(path, capfd) -> DammergeError:
    with pytest.raises(DammergeError) as info:
        load_records(DatasetSpec(path=str(path)), path.parent / "cache")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", "datasets printed its own message"
    assert "\n" not in info.value.message
    assert "An error occurred while generating the dataset" not in info.value.message
    return info.value


def test_a_bad_jsonl_line_is_named_with_its_column_and_cause(tmp_path, capfd):
    bad = '{"instruction": "a", "output": "b",}'
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{bad}\n{GOOD}\n")  # line 4 (blank line 2 counts)
    column, cause = reference_position(bad)
    error = load_error(path, capfd)
    assert error.message == f"dataset {path}: line 4, column {column}: {cause}"


def test_a_bad_json_document_is_named_with_its_line_and_column(tmp_path, capfd):
    path = tmp_path / "data.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": 1}\n]\n'
    )
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(path.read_text())
    error = load_error(path, capfd)
    expected = (reference.value.lineno, reference.value.colno, reference.value.msg)
    assert (
        error.message == f"dataset {path}: line {expected[0]}, column {expected[1]}: {expected[2]}"
    )
    assert expected[:2] == (3, 23)  # counted by hand: the quote of "output"


def test_json_lines_in_a_json_file_are_read_line_by_line(tmp_path, capfd):
    bad = '{"instruction": "a" "output": "b"}'
    path = tmp_path / "data.json"
    path.write_text(f"{GOOD}\n{GOOD}\n{bad}\n")
    column, cause = reference_position(bad)
    error = load_error(path, capfd)
    assert error.message == f"dataset {path}: line 3, column {column}: {cause}"


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n[1, 2]\n")
    assert json_syntax_error(path) == f"{path}: line 2: a record must be a JSON object, not a list"


def test_valid_files_have_no_syntax_error(tmp_path):
    lines = tmp_path / "ok.jsonl"
    lines.write_text(f"{GOOD}\n\n{GOOD}\n")
    document = tmp_path / "ok.json"
    document.write_text(f"[{GOOD}, {GOOD}]")
    assert json_syntax_error(lines) is None and json_syntax_error(document) is None


def test_other_failures_report_the_readers_own_cause(tmp_path, capfd):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")  # a row with a third field
    error = load_error(path, capfd)
    assert error.message.startswith(f"cannot read dataset {path}: ")
    assert "line 3" in error.message  # pandas' tokenizer names the row

"""Reading records: formats, field mapping, field checks, the seeded subset, JSONL helpers."""

from __future__ import annotations

import json

import pytest

from dammerge.data.records import (
    check_columns,
    load_records,
    opened_records,
    read_jsonl,
    select_records,
    write_jsonl,
)
from dammerge.data.spec import DatasetSpec
from dammerge.errors import DammergeError

RECORDS = [{"q": f"w{i} w{i + 1}", "ctx": "", "a": f"w{i + 2}"} for i in range(3, 13)]
MAPPED = {"instruction": "q", "input": "ctx", "output": "a"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "disk"])
def test_every_format_loads_with_field_mapping(tmp_path, fmt):
    import datasets

    table = datasets.Dataset.from_list(RECORDS)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    spec = DatasetSpec(path=str(path), fields=MAPPED)
    loaded = load_records(spec, tmp_path / "cache")
    check_columns(spec, loaded.column_names, "model m")
    assert len(loaded) == len(RECORDS)
    assert sorted(r["q"] for r in loaded) == sorted(r["q"] for r in RECORDS)


def test_missing_field_is_a_one_line_error(tmp_path):
    spec = DatasetSpec(path="x.jsonl")
    with pytest.raises(DammergeError, match=r"no column 'instruction'.*") as info:
        check_columns(spec, ["q", "a"], "model m")
    assert "\n" not in info.value.message and "q, a" in info.value.hint


def test_optional_input_only_when_not_mapped():
    check_columns(DatasetSpec(path="x"), ["instruction", "output"], "m")
    with pytest.raises(DammergeError, match="no column 'ctx'"):
        spec = DatasetSpec(path="x", fields={"input": "ctx"})
        check_columns(spec, ["instruction", "output"], "m")


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DammergeError, match="empty"):
        load_records(DatasetSpec(path=str(path)))


def test_samples_are_a_seeded_subset(tmp_path):
    import datasets

    table = datasets.Dataset.from_list(RECORDS)
    spec = DatasetSpec(path="x", samples=4)
    first = select_records(table, spec, seed=1, where="m")["q"]
    assert first == select_records(table, spec, seed=1, where="m")["q"]
    assert len(first) == 4 and first != select_records(table, spec, seed=2, where="m")["q"]


def test_a_missing_file_names_its_owner(tmp_path):
    with pytest.raises(DammergeError, match=r"dataset of model \./math not found: .*nope\.jsonl"):
        load_records(DatasetSpec(path=str(tmp_path / "nope.jsonl")), where="model ./math")


def test_a_record_without_its_text_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"instruction": "w1", "output": "w2"}, {"instruction": "w3"}])
    spec = DatasetSpec(path=str(path))
    with (
        pytest.raises(DammergeError, match="record 2 has no text field 'output'") as info,
        opened_records(spec, where="model m"),
    ):
        pass
    assert "\n" not in info.value.message
    # 'input' is optional: a record may lack it, or hold null
    write_jsonl(
        path,
        [
            {"instruction": "w1", "output": "w2"},
            {"instruction": "w3", "input": None, "output": "w4"},
        ],
    )
    with opened_records(DatasetSpec(path=str(path)), where="model m") as records:
        assert len(records) == 2


def test_opened_records_leave_no_cache_behind(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "d.jsonl"
    write_jsonl(path, RECORDS)
    spec = DatasetSpec(path=str(path), fields=MAPPED, samples=3)
    with opened_records(spec, where="m") as records:
        assert sorted(records.column_names) == ["a", "ctx", "q"]
        assert any((tmp_path / "tmp").iterdir())  # datasets' Arrow cache lives here meanwhile
    assert not any((tmp_path / "tmp").iterdir())


def test_jsonl_round_trip_keeps_text_and_skips_blank_lines(tmp_path):
    path = tmp_path / "sub" / "d.jsonl"
    write_jsonl(path, [{"text": "héllo"}, {"text": "b"}])
    assert "héllo" in path.read_text(encoding="utf-8")  # not escaped
    path.write_text(path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert read_jsonl(path) == [{"text": "héllo"}, {"text": "b"}]
    path.write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(DammergeError, match=r"d\.jsonl:2 is not valid JSON"):
        read_jsonl(path)

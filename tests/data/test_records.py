"""Reading records: formats, field mapping, field checks, the seeded subset, JSONL helpers."""

from __future__ import annotations

import json

import pytest

from dammerge.data.records import check_columns, load_records, select_records
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

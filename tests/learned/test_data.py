"""Datasets: formats, field mapping, templates, masks, padding and the visiting order."""

from __future__ import annotations

import json

import pytest

from dammerge.errors import DammergeError
from dammerge.learned.data import (
    SourceData,
    check_columns,
    collate,
    encode_record,
    load_records,
    select_records,
)
from dammerge.learned.settings import DatasetSettings
from dammerge.templates import alpaca_prompt
from dammerge.testing import tiny_tokenizer

RECORDS = [{"q": f"w{i} w{i + 1}", "ctx": "", "a": f"w{i + 2}"} for i in range(3, 13)]
MAPPED = {"instruction": "q", "input": "ctx", "output": "a"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


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
    spec = DatasetSettings(path=str(path), fields=MAPPED)
    loaded = load_records(spec, tmp_path / "cache")
    check_columns(spec, loaded.column_names, "model m")
    assert len(loaded) == len(RECORDS)
    assert sorted(r["q"] for r in loaded) == sorted(r["q"] for r in RECORDS)


def test_missing_field_is_a_one_line_error(tmp_path):
    spec = DatasetSettings(path="x.jsonl")
    with pytest.raises(DammergeError, match=r"no column 'instruction'.*") as info:
        check_columns(spec, ["q", "a"], "model m")
    assert "\n" not in info.value.message and "q, a" in info.value.hint


def test_optional_input_only_when_not_mapped():
    check_columns(DatasetSettings(path="x"), ["instruction", "output"], "m")
    with pytest.raises(DammergeError, match="no column 'ctx'"):
        spec = DatasetSettings(path="x", fields={"input": "ctx"})
        check_columns(spec, ["instruction", "output"], "m")


def test_unknown_field_name_rejected():
    with pytest.raises(ValueError, match="unknown field 'question'"):
        DatasetSettings(path="x", fields={"question": "q"})


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DammergeError, match="empty"):
        load_records(DatasetSettings(path=str(path)))


def test_samples_are_a_seeded_subset(tmp_path):
    import datasets

    table = datasets.Dataset.from_list(RECORDS)
    spec = DatasetSettings(path="x", samples=4)
    first = select_records(table, spec, seed=1, where="m")["q"]
    assert first == select_records(table, spec, seed=1, where="m")["q"]
    assert len(first) == 4 and first != select_records(table, spec, seed=2, where="m")["q"]


def test_alpaca_encoding_and_masks(tokenizer):
    record = {"instruction": "w3 w4", "input": "w5", "output": "w6 w7"}
    spec = DatasetSettings(path="x")
    full = encode_record(record, spec, tokenizer, loss_on="all", max_length=512)
    prompt = tokenizer(alpaca_prompt("w3 w4", "w5"))["input_ids"]
    response = tokenizer("w6 w7", add_special_tokens=False)["input_ids"]
    assert full.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert all(full.target_mask)
    only = encode_record(record, spec, tokenizer, loss_on="response", max_length=512)
    assert only.target_mask == [False] * len(prompt) + [True] * (len(response) + 1)
    short = encode_record(record, spec, tokenizer, loss_on="response", max_length=5)
    assert len(short.input_ids) == 5


def test_raw_template(tokenizer):
    spec = DatasetSettings(path="x", template="raw", fields={"text": "body"})
    example = encode_record({"body": "w3 w4 w5"}, spec, tokenizer, loss_on="response", max_length=9)
    assert example.input_ids[:3] == tokenizer("w3 w4 w5")["input_ids"][:3]
    assert all(example.target_mask)


def test_dynamic_padding_and_shifted_loss_mask():
    from dammerge.learned.data import Example

    batch = collate(
        [Example([1, 2, 3], [False, True, True]), Example([4, 5], [True, True])], [0, 1], pad_id=0
    )
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    # position t counts when token t + 1 is a target
    assert batch.loss_mask.tolist() == [[True, True, False], [True, False, False]]


def test_visiting_order_is_a_function_of_the_step():
    from dammerge.learned.data import Example

    examples = [Example([i, i], [True, True]) for i in range(5)]
    data = SourceData(examples, seed=3, source=1, batch_size=2, pad_id=0)
    epoch = [i for step in range(5) for i in data.indices(step)]
    assert sorted(epoch[:5]) == list(range(5)) and sorted(epoch[5:]) == list(range(5))
    again = SourceData(examples, seed=3, source=1, batch_size=2, pad_id=0)
    assert again.indices(4) == data.indices(4) and again.indices(0) == data.indices(0)
    other = SourceData(examples, seed=3, source=2, batch_size=2, pad_id=0)
    assert [other.indices(s) for s in range(3)] != [data.indices(s) for s in range(3)]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_chat_template_prompt_is_the_generation_prompt_and_only_the_reply_counts():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    record = {"instruction": "w3 w4", "input": "w5", "output": "w6 w7"}
    spec = DatasetSettings(path="x", template="chat")
    example = encode_record(record, spec, tokenizer, loss_on="response", max_length=512)
    user = {"role": "user", "content": "w3 w4\n\nw5"}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": "w6 w7"}], tokenize=False
    )
    assert tokenizer.decode(example.input_ids) == tokenizer.decode(tokenizer(full)["input_ids"])
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert example.target_mask == [False] * n_prompt + [True] * (len(example.input_ids) - n_prompt)
    assert tokenizer.decode(example.input_ids[n_prompt:]).strip().startswith("w6 w7")


def test_chat_template_without_one_on_the_tokenizer_is_a_one_line_error():
    from dammerge.learned.data import encode_dataset

    spec = DatasetSettings(path="x", template="chat")
    with pytest.raises(DammergeError, match="no chat template"):
        encode_dataset(
            [{"instruction": "w3", "output": "w4"}],
            spec,
            tiny_tokenizer(),
            loss_on="response",
            max_length=64,
            where="source lang",
        )

"""Encoding records: templates, masks, truncation, and dynamic padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dammerge.data.examples import (
    Example,
    collate,
    encode_dataset,
    encode_prompt,
    encode_record,
    pad_id,
)
from dammerge.data.spec import DatasetSpec
from dammerge.errors import DammergeError
from dammerge.templates import alpaca_prompt
from dammerge.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_alpaca_encoding_and_masks(tokenizer):
    record = {"instruction": "w3 w4", "input": "w5", "output": "w6 w7"}
    spec = DatasetSpec(path="x")
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
    spec = DatasetSpec(path="x", template="raw", fields={"text": "body"})
    example = encode_record({"body": "w3 w4 w5"}, spec, tokenizer, loss_on="response", max_length=9)
    assert example.input_ids[:3] == tokenizer("w3 w4 w5")["input_ids"][:3]
    assert all(example.target_mask)


def test_dynamic_padding_and_shifted_loss_mask():
    batch = collate(
        [Example([1, 2, 3], [False, True, True]), Example([4, 5], [True, True])], [0, 1], pad_id=0
    )
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    # position t counts when token t + 1 is a target
    assert batch.loss_mask.tolist() == [[True, True, False], [True, False, False]]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_chat_template_prompt_is_the_generation_prompt_and_only_the_reply_counts():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    record = {"instruction": "w3 w4", "input": "w5", "output": "w6 w7"}
    spec = DatasetSpec(path="x", template="chat")
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
    spec = DatasetSpec(path="x", template="chat")
    with pytest.raises(DammergeError, match="no chat template"):
        encode_dataset(
            [{"instruction": "w3", "output": "w4"}],
            spec,
            tiny_tokenizer(),
            loss_on="response",
            max_length=64,
            where="source lang",
        )


def test_from_parts_truncates_and_splits_at_the_first_target():
    example = Example.from_parts([1, 2, 3], [4, 5], max_length=4)
    assert example.input_ids == [1, 2, 3, 4]
    assert example.target_mask == [False, False, False, True]
    assert (example.prompt_ids, example.response_ids, example.response_start) == ([1, 2, 3], [4], 3)
    everything = Example.from_parts([1, 2], [3], prompt_is_target=True)
    assert everything.target_mask == [True, True, True] and everything.response_start == 0
    cut = Example.from_parts([1, 2, 3], [4], max_length=2)
    assert cut.response_ids == [] and cut.prompt_ids == [1, 2]


def test_the_prompt_is_what_generation_continues(tokenizer):
    record = {"instruction": "w3 w4", "input": "", "output": "w6 w7"}
    spec = DatasetSpec(path="x")
    prompt = encode_prompt(record, spec, tokenizer)
    assert prompt == tokenizer(alpaca_prompt("w3 w4"))["input_ids"]
    assert encode_record(record, spec, tokenizer).prompt_ids == prompt
    assert encode_prompt({"text": "w3"}, DatasetSpec(path="x", template="raw"), tokenizer) == []


def test_records_that_lose_every_target_are_dropped_and_none_left_is_an_error(tokenizer):
    spec = DatasetSpec(path="data.jsonl")
    short = {"instruction": "w3", "output": "w4"}
    long = {"instruction": " ".join(f"w{i}" for i in range(3, 60)), "output": "w4"}
    options = {"loss_on": "response", "max_length": 40, "where": "m"}
    kept = encode_dataset([short, long], spec, tokenizer, **options)
    assert len(kept) == 1 and kept[0].input_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(DammergeError, match=r"no example of data\.jsonl keeps a target") as info:
        encode_dataset([long], spec, tokenizer, **options)
    assert "loss_on: all" in info.value.hint


def test_pad_id_falls_back_to_eos_then_zero(tokenizer):
    assert pad_id(tokenizer) == tokenizer.pad_token_id
    no_pad = SimpleNamespace(pad_token_id=None, eos_token_id=7)
    assert pad_id(no_pad) == 7
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_batch_counts_real_tokens_and_moves_whole():
    batch = collate([Example([1, 2, 3], [False, True, True]), Example([4], [True])], [5, 6], 0)
    assert batch.tokens == 4 and batch.to("cpu").indices == [5, 6]

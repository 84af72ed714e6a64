"""Loading a model folder's tokenizer: one-line errors for what is missing."""

from __future__ import annotations

import pytest

from dammerge.data.tokenizer import eos_token_id, load_tokenizer
from dammerge.errors import DammergeError
from dammerge.testing import tiny_tokenizer


def test_a_saved_tokenizer_loads_with_its_eos(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path, require_eos=True)
    assert eos_token_id(tokenizer) == tiny_tokenizer().eos_token_id


def test_a_folder_without_tokenizer_files_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DammergeError, match="has no tokenizer files") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in info.value.message


def test_a_broken_tokenizer_file_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DammergeError, match="cannot load the tokenizer of") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in info.value.message


def test_eos_can_be_required(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).eos_token_id is None
    with pytest.raises(DammergeError, match="has no EOS token"):
        load_tokenizer(tmp_path, require_eos=True)

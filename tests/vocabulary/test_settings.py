"""The ``tokenizer:`` block as a recipe states it: parsing, paths, and the written recipe."""

from __future__ import annotations

import yaml

from dammerge.config import MergeConfig
from dammerge.vocabulary.settings import (
    ModelTokenEmbedding,
    TokenizerSettings,
    ZeroEmbedding,
    tokenizer_settings,
)

RECIPE = """
merge_method: linear
models:
  - {model: base, parameters: {weight: 1}}
  - {model: chat, parameters: {weight: 1}}
tokenizer:
  source: union
  tokens:
    <|im_start|>: {source: chat}
    <|im_end|>: {source: {kind: model_token, model: ./chat, token: </s>}, force: true}
    <pad>: {source: {kind: zero}}
    <plain>: {}
  pad_to_multiple_of: 64
chat_template: chatml
"""


def test_the_block_parses_and_its_model_paths_resolve_from_the_recipe(tmp_path):
    (tmp_path / "recipe.yml").write_text(RECIPE)
    cfg = MergeConfig.from_yaml(tmp_path / "recipe.yml")
    block = cfg.tokenizer
    assert block is not None and block.source == "union" and block.pad_to_multiple_of == 64
    tokens = block.tokens or {}
    assert tokens["<|im_start|>"].source == str(tmp_path / "chat")
    assert tokens["<|im_end|>"].source == ModelTokenEmbedding(
        kind="model_token", model=str(tmp_path / "chat"), token="</s>"
    )
    assert tokens["<|im_end|>"].force
    assert tokens["<pad>"].source == ZeroEmbedding(kind="zero")
    assert tokens["<plain>"].source is None
    assert block.token_models() == {
        "<|im_start|>": str(tmp_path / "chat"),
        "<|im_end|>": str(tmp_path / "chat"),
    }
    assert cfg.chat_template == "chatml"


def test_the_written_recipe_reads_back_the_same(tmp_path):
    (tmp_path / "recipe.yml").write_text(RECIPE)
    cfg = MergeConfig.from_yaml(tmp_path / "recipe.yml")
    written = yaml.safe_load(cfg.to_yaml())
    assert written["tokenizer"]["tokens"]["<pad>"]["source"] == {"kind": "zero"}
    assert MergeConfig.from_dict(written) == cfg


def test_tokenizer_source_is_the_block_without_tokens(tmp_path):
    assert tokenizer_settings(None, None) is None
    assert tokenizer_settings(None, "union") == TokenizerSettings(source="union")
    block = TokenizerSettings(source="base", pad_to_multiple_of=8)
    assert tokenizer_settings(block, None) is block
    (tmp_path / "recipe.yml").write_text("merge_method: linear\ntokenizer: {source: base}\n")
    assert MergeConfig.from_yaml(tmp_path / "recipe.yml").tokenizer == TokenizerSettings(
        source="base"
    )

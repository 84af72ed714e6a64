"""Tiny Llama models whose tokenizers differ, built once per session (read-only).

- ``base``: the tiny tokenizer (128 tokens) and 128 embedding rows;
- ``a``: a fine-tune of it with added tokens ``<a1>``, ``<a2>`` (130 rows);
- ``b``: another with a special ``<b1>`` and a plain ``<a1>`` added (130 rows);
- ``p``: a third whose vocabulary holds the base's tokens under shuffled ids, rows shuffled to
  match, and ``w7`` replaced by a token of its own, ``<p7>`` (128 rows);
- ``bare``: a fourth without tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dammerge.testing import make_family

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _copy_weights(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    dst.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return load_file(src / "model.safetensors")


def _save(dst: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] = state[VOCABULARY_TENSORS[0]].shape[0]
    (dst / "config.json").write_text(json.dumps(config))


def with_added_tokens(src: Path, dst: Path, tokens: list, seed: int) -> Path:
    """``src`` with ``tokens`` added to its tokenizer and seeded random rows for them."""
    state = _copy_weights(src, dst)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens(tokens)
    tokenizer.save_pretrained(dst)
    generator = torch.Generator().manual_seed(seed)
    for name in VOCABULARY_TENSORS:
        old = state[name]
        new = torch.randn((len(tokenizer) - old.shape[0], old.shape[1]), generator=generator)
        state[name] = torch.cat([old, new.to(old.dtype)])
    _save(dst, state)
    return dst


def with_shuffled_ids(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with the ids of its word tokens shuffled (rows moved along) and ``w7``
    renamed ``<p7>``; the special tokens keep ids 0-2."""
    state = _copy_weights(src, dst)
    vocab = AutoTokenizer.from_pretrained(src).get_vocab()
    order = torch.randperm(len(vocab) - 3, generator=torch.Generator().manual_seed(seed)) + 3
    new_ids = {
        0: 0,
        1: 1,
        2: 2,
        **{old: int(new) for old, new in zip(range(3, len(vocab)), order, strict=True)},
    }
    shuffled = {("<p7>" if t == "w7" else t): new_ids[i] for t, i in vocab.items()}
    backend = Tokenizer(models.WordLevel(vocab=shuffled, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    ).save_pretrained(dst)
    inverse = torch.empty(len(vocab), dtype=torch.long)
    for old, new in new_ids.items():
        inverse[new] = old
    for name in VOCABULARY_TENSORS:
        state[name] = state[name][inverse].contiguous()
    _save(dst, state)
    return dst


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocabulary")
    base, variants = make_family(root / "family", "llama", n=4)
    bare = root / "bare"
    state = _copy_weights(variants[3], bare)
    _save(bare, state)
    return {
        "base": base,
        "a": with_added_tokens(variants[0], root / "a", ["<a1>", "<a2>"], seed=1),
        "b": with_added_tokens(
            variants[1], root / "b", [AddedToken("<b1>", special=True), "<a1>"], seed=2
        ),
        "p": with_shuffled_ids(variants[2], root / "p", seed=3),
        "bare": bare,
    }

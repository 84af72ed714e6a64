"""Embedding and lm_head rows of merges whose models' tokenizers differ, against a brute-force
reference written here from the documented rule (each model's own row, else the token's fill
row: its configured source; the only model that has it; zeros; the base's; the mean)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dammerge
from dammerge.config import MergeConfig
from dammerge.plan import build_plan

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
RTOL, ATOL = 1e-6, 1e-6


@functools.cache
def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (cached: the reference reads them once per token)."""
    return load_file(folder / "model.safetensors")


@functools.cache
def vocab(folder: Path) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(folder).get_vocab()


def model_rows(
    token: str,
    folders: list[Path],
    name: str,
    base: Path | None,
    tokens: dict[str, Any],
    read_as: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Each model's row for ``token`` in the output, by the documented rule, from weights
    read rounded to ``read_as``."""
    vocabs = [vocab(f) if (f / "tokenizer.json").is_file() else vocab(folders[0]) for f in folders]
    weights = [tensors(f)[name].to(read_as).float() for f in folders]
    have = [k for k, v in enumerate(vocabs) if token in v and v[token] < len(weights[k])]
    entry = tokens.get(token, {})
    source = entry.get("source")
    if isinstance(source, dict) and source["kind"] == "zero":
        fill = torch.zeros_like(weights[0][0])
    elif isinstance(source, dict):
        k = folders.index(Path(source["model"]))
        fill = weights[k][vocabs[k][source["token"]]]
    elif isinstance(source, str):
        k = folders.index(Path(source))
        fill = weights[k][vocabs[k][token]]
    elif len(have) == 1:
        fill = weights[have[0]][vocabs[have[0]][token]]
    elif not have:
        fill = torch.zeros_like(weights[0][0])
    elif base in folders and folders.index(base) in have:
        k = folders.index(base)
        fill = weights[k][vocabs[k][token]]
    else:
        fill = sum(weights[k][vocabs[k][token]] for k in have) / len(have)
    forced = entry.get("force", False)
    return [
        weights[k][vocabs[k][token]] if k in have and not forced else fill
        for k in range(len(folders))
    ]


def linear_rows(out_vocab: dict[str, int], folders, weights, name, tokens=None) -> torch.Tensor:
    """The expected merged tensor of a normalised linear merge, row by row."""
    rows = torch.zeros(len(out_vocab), tensors(folders[0])[name].shape[1])
    for token, index in out_vocab.items():
        own = model_rows(token, folders, name, None, tokens or {})
        rows[index] = sum(w * r for w, r in zip(weights, own, strict=True)) / sum(weights)
    return rows


def recipe(models: list[Path], weights: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(m), "parameters": {"weight": w}}
            for m, w in zip(models, weights, strict=True)
        ],
        **extra,
    }


def loads_with_transformers(out: Path, rows: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows


def test_union_vocabulary_and_rows(vocab_models, tmp_path):
    m = vocab_models
    folders, weights = [m["base"], m["a"], m["b"], m["p"]], [1.0, 2.0, 3.0, 0.5]
    out = dammerge.merge(
        recipe(folders, weights, tokenizer_source="union"), tmp_path / "out", progress=False
    )
    out_vocab = vocab(out)
    base_vocab = vocab(m["base"])
    # the base's ids, then the vocabulary tokens new to it, then the added ones, recipe order
    assert {t: out_vocab[t] for t in base_vocab} == base_vocab
    assert {t: i for t, i in out_vocab.items() if t not in base_vocab} == {
        "<p7>": 128,
        "<a1>": 129,
        "<a2>": 130,
        "<b1>": 131,
    }
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 <a1> <b1> <p7>").input_ids == [base_vocab["w3"], 129, 131, 128]
    assert tokenizer.added_tokens_decoder[131].special  # b's settings for its token
    merged = tensors(out)
    for name in VOCABULARY_TENSORS:
        expected = linear_rows(out_vocab, folders, weights, name)
        torch.testing.assert_close(merged[name], expected, rtol=RTOL, atol=ATOL)
    loads_with_transformers(out, 132)


def test_union_takes_the_base_row_where_the_base_has_the_token(vocab_models, tmp_path):
    """``w7``: the base, a and b have it, p lacks it: p gets the base's row (not the mean)."""
    m = vocab_models
    ft = [m["a"], m["b"], m["p"]]
    weights = [0.7, 0.4, 0.9]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(f), "parameters": {"weight": w}} for f, w in zip(ft, weights, strict=True)
        ],
        "tokenizer": {"source": "union"},
    }
    out = dammerge.merge(cfg, tmp_path / "out", progress=False)
    out_vocab = vocab(out)
    folders = [*ft, m["base"]]
    merged = tensors(out)
    for name in VOCABULARY_TENSORS:
        for token, index in out_vocab.items():
            *rows, base_row = model_rows(token, folders, name, m["base"], {})
            expected = base_row + sum(
                w * (r - base_row) for w, r in zip(weights, rows, strict=True)
            )
            torch.testing.assert_close(merged[name][index], expected, rtol=RTOL, atol=ATOL)
        w7 = model_rows("w7", folders, name, m["base"], {})
        torch.testing.assert_close(w7[2], tensors(m["base"])[name][vocab(m["base"])["w7"]])
    loads_with_transformers(out, 132)


def test_configured_tokens_forced_rows_and_padding(vocab_models, tmp_path):
    m = vocab_models
    folders, weights = [m["base"], m["a"], m["b"]], [1.0, 1.0, 2.0]
    tokens = {
        "<a2>": {"source": {"kind": "zero"}},  # b and the base get zeros, a keeps its own
        "<a1>": {"source": str(m["b"]), "force": True},  # every model takes b's row
        "<new>": {"source": {"kind": "model_token", "model": str(m["a"]), "token": "w5"}},
        "<z>": {},  # in no model: zeros
    }
    cfg = recipe(
        folders,
        weights,
        tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 8},
    )
    out = dammerge.merge(cfg, tmp_path / "out", progress=False)
    out_vocab = vocab(out)
    assert len(out_vocab) == 133 and out_vocab["<new>"] == 131 and out_vocab["<z>"] == 132
    merged = tensors(out)
    for name in VOCABULARY_TENSORS:
        assert merged[name].shape[0] == 136  # 133 rounded up to a multiple of 8
        expected = linear_rows(out_vocab, folders, weights, name, tokens)
        torch.testing.assert_close(merged[name][:133], expected, rtol=RTOL, atol=ATOL)
        # padding rows: each model's mean row; a linear merge of means is the merged mean
        padding = expected.mean(dim=0).expand(3, -1)
        torch.testing.assert_close(merged[name][133:], padding, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[name][out_vocab["<a1>"]], tensors(m["b"])[name][129])
        torch.testing.assert_close(
            merged[name][out_vocab["<new>"]], tensors(m["a"])[name][vocab(m["a"])["w5"]]
        )
        assert not merged[name][out_vocab["<z>"]].any()
    loads_with_transformers(out, 136)


def test_base_tokenizer_source_reorders_and_trims_rows(vocab_models, tmp_path):
    """p's rows come back in the base's order; a's extra rows are dropped; w7, which p lacks,
    is the mean of the base's and a's rows for it (a linear recipe has no base model)."""
    m = vocab_models
    folders, weights = [m["base"], m["p"], m["a"]], [1.0, 1.0, 1.0]
    out = dammerge.merge(
        recipe(folders, weights, tokenizer_source="base"), tmp_path / "out", progress=False
    )
    base_vocab = vocab(m["base"])
    assert vocab(out) == base_vocab
    assert (out / "tokenizer.json").read_bytes() == (m["base"] / "tokenizer.json").read_bytes()
    merged = tensors(out)
    for name in VOCABULARY_TENSORS:
        expected = linear_rows(base_vocab, folders, weights, name)
        torch.testing.assert_close(merged[name], expected, rtol=RTOL, atol=ATOL)
    loads_with_transformers(out, 128)


def test_a_model_folder_as_tokenizer_source(vocab_models, tmp_path):
    m = vocab_models
    folders, weights = [m["base"], m["a"], m["bare"]], [1.0, 2.0, 1.0]
    cfg = recipe(folders, weights, tokenizer={"source": str(m["a"])})
    out = dammerge.merge(cfg, tmp_path / "out", progress=False)
    assert vocab(out) == vocab(m["a"])
    merged = tensors(out)
    for name in VOCABULARY_TENSORS:
        expected = linear_rows(vocab(m["a"]), folders, weights, name)
        torch.testing.assert_close(merged[name], expected, rtol=RTOL, atol=ATOL)
    loads_with_transformers(out, 130)


def test_shared_tokenizers_leave_the_plan_and_files_unchanged(llama_family, tmp_path):
    base, (a, b, _) = llama_family
    cfg = recipe([base, a, b], [1.0, 1.0, 1.0], tokenizer_source="union")
    plan = build_plan(MergeConfig.from_dict(cfg))
    assert plan.vocabulary is not None and not plan.vocabulary.added
    assert all(tensor.rows is None for tensor in plan.tensors)
    out = dammerge.merge(cfg, tmp_path / "out", progress=False)
    plain = dammerge.merge(
        recipe([base, a, b], [1.0, 1.0, 1.0]), tmp_path / "plain", progress=False
    )
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    for name, tensor in tensors(plain).items():
        assert torch.equal(tensors(out)[name], tensor), name


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Representable bfloat16 values between ``a`` and ``b``, entry by entry."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).long()
        return torch.where(bits < 0, -(2**15) - bits, bits)

    return (ordered(a) - ordered(b)).abs()


def test_half_precision_rows_round_once(vocab_models, tmp_path):
    """``dtype: bfloat16``: inputs rounded to bfloat16, rows rebuilt and merged in float32,
    the result rounded once (within one ulp: the float32 sums may round differently)."""
    m = vocab_models
    folders, weights = [m["base"], m["a"], m["b"]], [1.0, 2.0, 3.0]
    cfg = recipe(folders, weights, tokenizer_source="union", dtype="bfloat16")
    out = dammerge.merge(cfg, tmp_path / "out", progress=False)
    out_vocab = vocab(out)
    merged = tensors(out)
    for name in VOCABULARY_TENSORS:
        rows = torch.zeros(len(out_vocab), tensors(folders[0])[name].shape[1])
        for token, index in out_vocab.items():
            own = model_rows(token, folders, name, None, {}, read_as=torch.bfloat16)
            rows[index] = sum(w * r for w, r in zip(weights, own, strict=True)) / sum(weights)
        assert merged[name].dtype == torch.bfloat16
        assert ulp_distance(merged[name], rows.bfloat16()).max() <= 1


@pytest.mark.parametrize(
    ("tokenizer", "match"),
    [
        ({"tokens": {"<a1>": {"source": "/elsewhere/model"}}}, "does not merge"),
        ({"tokens": {"<zz>": {"source": "A"}}}, "has no token '<zz>'"),
        (
            {"tokens": {"<zz>": {"source": {"kind": "model_token", "model": "A", "token": "no"}}}},
            "has no token 'no'",
        ),
        (
            {"tokens": {"<z>": {"source": {"kind": "model_token", "model": "A", "token_id": 130}}}},
            "token_id 130 is outside",
        ),
        ({"source": "/elsewhere/model"}, "holds no tokenizer files"),
    ],
)
def test_token_sources_are_checked_before_compute(vocab_models, tmp_path, tokenizer, match):
    m = vocab_models
    for entry in tokenizer.get("tokens", {}).values():
        source = entry["source"]
        if source == "A":
            entry["source"] = str(m["a"])
        elif isinstance(source, dict):
            source["model"] = str(m["a"])
    cfg = recipe([m["base"], m["a"]], [1.0, 1.0], tokenizer=tokenizer)
    with pytest.raises(dammerge.DammergeError, match=match):
        dammerge.merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
        ({"tokenizer": {"tokens": {"<x>": {"force": True}}}}, "needs a 'source'"),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token"}}}}}, "model"),
        ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"}, "not both"),
    ],
)
def test_bad_tokenizer_blocks_are_one_line_config_errors(extra, match):
    with pytest.raises(dammerge.DammergeError, match=match) as caught:
        MergeConfig.from_dict({"merge_method": "linear", "models": [], **extra})
    assert "\n" not in caught.value.message

"""The tokenizer block, ``tokenizer_source`` and ``chat_template`` against mergekit 0.1.5.

Each recipe is merged by ``mergekit-multi`` (one process) and by :func:`dammerge.merge`. The
two outputs must hold the same tokens, each token's embedding and ``lm_head`` rows equal (in
float32; within one unit in the last place in bfloat16), the same padding rows, the same added
tokens' settings and ``vocab_size``. Rows are compared token by token: mergekit takes the
models from a set, so the ids it gives new tokens may come in another order.

The vocabulary starts from the base model's tokenizer, so every recipe names one: without it
mergekit takes the first of a set of models, which changes from run to run.

Not compared: a configured token without a source that some model lacks (mergekit stops with
NotImplementedError; dammerge applies the usual rule), and the chat templates whose shipped
text differs (see docs/mergekit.md): only ``chatml`` and ``mistral`` render alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoTokenizer

import dammerge

from ..test_mergekit_crosscheck import load_tensors, mergekit_tool, run_mergekit, ulp_distance
from .test_chat import CONVERSATION

pytestmark = pytest.mark.slow

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
OPTIONS = ["--no-write-model-card", "--lazy-unpickle", "--quiet"]


def linear(models: list[str], weights: list[float], **extra: Any) -> dict[str, Any]:
    """A linear recipe whose base_model is its first model: without one, mergekit starts the
    vocabulary from whichever model its set of models yields first."""
    return {
        "merge_method": "linear",
        "base_model": models[0],
        "models": [
            {"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights, strict=True)
        ],
        **extra,
    }


def recipes(m: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The compared recipes, on the vocab_models fixture's folders."""
    tokens = {
        "<a2>": {"source": {"kind": "zero"}},
        "<a1>": {"source": m["b"], "force": True},
        "<new>": {"source": {"kind": "model_token", "model": m["a"], "token": "w5"}},
    }
    union = linear([m["base"], m["a"], m["b"], m["p"]], [1.0, 2.0, 3.0, 0.5])
    return {
        "union_linear": {**union, "tokenizer_source": "union", "dtype": "float32"},
        "union_linear_bf16": {**union, "tokenizer_source": "union", "dtype": "bfloat16"},
        "union_task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": m["base"],
            "models": [
                {"model": m[k], "parameters": {"weight": w}}
                for k, w in (("a", 0.7), ("b", 0.4), ("p", 0.9))
            ],
            "tokenizer": {"source": "union"},
            "dtype": "float32",
        },
        "tokens_and_padding": linear(
            [m["base"], m["a"], m["b"]],
            [1.0, 1.0, 2.0],
            tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 8},
            dtype="float32",
        ),
        "base_permuted": linear(
            [m["base"], m["p"], m["a"]], [1.0, 1.0, 1.0], tokenizer_source="base", dtype="float32"
        ),
        # same rows and special tokens: whichever tokenizer mergekit copies renders alike
        "chatml": linear([m["base"], m["p"]], [1.0, 1.0], chat_template="chatml"),
        "mistral": linear([m["base"], m["p"]], [1.0, 1.0], chat_template="mistral"),
    }


@pytest.fixture(scope="module")
def paths(vocab_models) -> dict[str, str]:
    return {key: str(path) for key, path in vocab_models.items()}


@pytest.fixture(scope="module")
def mergekit_outputs(paths, tmp_path_factory) -> dict[str, Path]:
    tool = mergekit_tool("mergekit-multi")
    work = tmp_path_factory.mktemp("mergekit-vocabulary")
    documents = [{"name": f"recipe-{name}", **r} for name, r in recipes(paths).items()]
    config = work / "recipes.yml"
    config.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    run_mergekit([str(tool), str(config), "-I", str(work / "out"), "--no-lazy", *OPTIONS])
    return {name: work / "out" / f"recipe-{name}" for name in recipes(paths)}


def added_settings(folder: Path) -> dict[str, tuple[bool, bool, bool, bool, bool]]:
    decoder = AutoTokenizer.from_pretrained(folder).added_tokens_decoder
    return {
        t.content: (t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
        for t in decoder.values()
    }


def assert_same_vocabulary_rows(ours: Path, theirs: Path, dtype: torch.dtype) -> None:
    ours_vocab = AutoTokenizer.from_pretrained(ours).get_vocab()
    theirs_vocab = AutoTokenizer.from_pretrained(theirs).get_vocab()
    assert set(ours_vocab) == set(theirs_vocab)
    assert added_settings(ours) == added_settings(theirs)
    sizes = [json.loads((f / "config.json").read_text())["vocab_size"] for f in (ours, theirs)]
    assert sizes[0] == sizes[1]
    tokens = sorted(ours_vocab)
    a, b = load_tensors(ours), load_tensors(theirs)
    for name in VOCABULARY_TENSORS:
        assert a[name].shape == b[name].shape, name
        mine = a[name][[ours_vocab[t] for t in tokens]]
        other = b[name][[theirs_vocab[t] for t in tokens]].to(dtype)
        padding = slice(len(tokens), None)
        if dtype == torch.float32:
            torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a[name][padding], b[name][padding], rtol=1e-5, atol=1e-6)
        else:
            assert ulp_distance(mine, other).max() <= 1, name
            assert (ulp_distance(a[name][padding], b[name][padding].to(dtype)) <= 1).all()


@pytest.mark.parametrize(
    "name", ["union_linear", "union_task_arithmetic", "tokens_and_padding", "base_permuted"]
)
def test_vocabulary_rows_match_mergekit(name, paths, mergekit_outputs, tmp_path):
    ours = dammerge.merge(recipes(paths)[name], tmp_path / name, progress=False)
    assert_same_vocabulary_rows(ours, mergekit_outputs[name], torch.float32)


def test_half_precision_union_within_one_ulp_of_mergekit(paths, mergekit_outputs, tmp_path):
    name = "union_linear_bf16"
    ours = dammerge.merge(recipes(paths)[name], tmp_path / name, progress=False)
    assert_same_vocabulary_rows(ours, mergekit_outputs[name], torch.bfloat16)


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_chat_template_renders_as_mergekits(name, paths, mergekit_outputs, tmp_path):
    ours = dammerge.merge(recipes(paths)[name], tmp_path / name, progress=False)
    rendered = [
        AutoTokenizer.from_pretrained(folder).apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True
        )
        for folder in (ours, mergekit_outputs[name])
    ]
    assert rendered[0] == rendered[1]

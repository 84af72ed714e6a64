"""End to end: recipe -> merged checkpoint that transformers loads."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import dammerge


def test_linear_merge_equals_average_and_loads(llama_family, tmp_path):
    _base, variants = llama_family
    out = dammerge.merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(v), "parameters": {"weight": 1.0}} for v in variants],
        },
        tmp_path / "merged",
        progress=False,
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    sources = [AutoModelForCausalLM.from_pretrained(v) for v in variants]
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = sum(dict(s.named_parameters())[name] for s in sources) / 3
    torch.testing.assert_close(dict(merged.named_parameters())[name], expected)
    logits = merged(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "merge_method: linear" in (out / "README.md").read_text()

"""End-to-end family builds: contract, loading with transformers, cache, determinism, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dammerge.data.records import read_jsonl
from dammerge.family.build import SIZES, build_family, with_steps
from dammerge.family.manifest import load_family
from dammerge.scoring.metrics import METRICS

pytestmark = pytest.mark.slow

MODELS = ("base", "lang", "math", "sql")


def tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(root / name / "model.safetensors") for name in MODELS}


def test_micro_family_follows_the_contract(micro_family):
    family = load_family(micro_family)
    manifest = family.manifest
    assert manifest["size"] == "micro" and manifest["seed"] == 0
    assert len(manifest["content_hash"]) == 64
    assert manifest["build_seconds"] > 0
    assert set(family.models) == set(MODELS)
    for name, spec in family.domains.items():
        assert spec.metric in METRICS
        assert spec.specialist_dir == family.model_dir(name)
        assert read_jsonl(spec.train) and read_jsonl(spec.eval)
    assert family.compositional is not None and read_jsonl(family.compositional.eval)
    scores = manifest["quality"]["scores"]
    assert set(scores) == set(MODELS)
    for row in scores.values():
        assert set(row) == {"lang", "math", "sql", "compositional"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    for name in MODELS:
        for file in (
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ):
            assert (family.model_dir(name) / file).is_file()


def test_transformers_loads_every_model_offline_and_generates(micro_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dammerge.templates import alpaca_prompt

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer_json = (micro_family / "base" / "tokenizer.json").read_bytes()
    for name in MODELS:
        folder = micro_family / name
        assert (folder / "tokenizer.json").read_bytes() == tokenizer_json
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert model.config.tie_word_embeddings is False
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        encoded = tokenizer(
            alpaca_prompt("Solve the problem.", "Tom has 3 apples."), return_tensors="pt"
        )
        out = model.generate(
            **encoded, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        assert out.shape[1] > encoded["input_ids"].shape[1]
        assert torch.isfinite(model(**encoded).logits).all()


def test_specialists_differ_from_the_base_and_each_other(micro_family):
    weights = tensors(micro_family)
    key = "model.layers.0.mlp.down_proj.weight"
    for a in MODELS:
        for b in MODELS:
            if a < b:
                assert not torch.equal(weights[a][key], weights[b][key])


def test_same_seed_rebuild_is_bit_identical(micro_family, tmp_path):
    """(Its time is the benchmarks' business: bench/family_build.py alone, bench/contention.py
    beside copies of itself; a time limit here fails whenever the machine is shared.)"""
    again = build_family(tmp_path / "again", "micro", 0)
    assert not again.cached
    first, second = tensors(micro_family), tensors(again.root)
    for name in MODELS:
        assert first[name].keys() == second[name].keys()
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), (name, key)
    manifest = json.loads((micro_family / "manifest.json").read_text())
    assert again.manifest["content_hash"] == manifest["content_hash"]
    for split in ("lang/train", "math/eval", "sql/train", "compositional/eval"):
        path = Path("data") / f"{split}.jsonl"
        assert (again.root / path).read_bytes() == (micro_family / path).read_bytes()


def test_second_build_into_the_same_folder_is_a_cache_hit(micro_family):
    before = (micro_family / "manifest.json").read_text()
    started = time.perf_counter()
    result = build_family(micro_family, "micro", 0)
    assert result.cached and time.perf_counter() - started < 2
    assert (micro_family / "manifest.json").read_text() == before


def test_different_seed_differs_and_thread_count_is_part_of_the_cache_key(tmp_path):
    nano = with_steps(SIZES["micro"], "nano", pretrain=4, finetune=2)
    a = build_family(tmp_path / "a", nano, 0, threads=1)
    b = build_family(tmp_path / "b", nano, 1, threads=1)
    assert a.manifest["content_hash"] != b.manifest["content_hash"]
    wa, wb = tensors(a.root), tensors(b.root)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(wa["base"][key], wb["base"][key])
    again = build_family(tmp_path / "again", nano, 0, threads=1)
    assert again.manifest["content_hash"] == a.manifest["content_hash"]
    assert a.manifest["threads"] == 1
    # Another thread count may change the bits, so it never reuses a build made with this one.
    assert build_family(tmp_path / "a", nano, 0, threads=1).cached
    assert not build_family(tmp_path / "a", nano, 0, threads=2, force=True).cached
    assert not list(tmp_path.glob(".*dammerge-tmp*"))  # temporary folders renamed away


def test_thread_count_comes_from_the_environment_or_is_two(monkeypatch):
    from dammerge.errors import DammergeError
    from dammerge.family.build import build_threads

    monkeypatch.delenv("DAMMERGE_THREADS", raising=False)
    assert build_threads() == 2
    monkeypatch.setenv("DAMMERGE_THREADS", "1")
    assert build_threads() == 1
    monkeypatch.setenv("DAMMERGE_THREADS", "many")
    with pytest.raises(DammergeError, match="DAMMERGE_THREADS"):
        build_threads()


def test_build_refuses_a_folder_holding_something_else(tmp_path):
    from dammerge.errors import DammergeError

    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(DammergeError, match="already holds"):
        build_family(tmp_path / "occupied", "micro", 0)
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"
    with pytest.raises(DammergeError, match="unknown family size"):
        build_family(tmp_path / "x", "huge", 0)
    assert not (tmp_path / "x").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", "from dammerge.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_reports_cache_hits_and_bad_input(micro_family, tmp_path):
    hit = run_cli("family", "build", str(micro_family), "--size", "micro", "--seed", "0")
    assert hit.returncode == 0, hit.stderr
    assert "cache hit" in hit.stderr
    bad = run_cli("family", "build", str(tmp_path / "f"), "--size", "huge")
    assert bad.returncode == 2
    assert "error: unknown family size 'huge'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "f").exists()
    (tmp_path / "file").write_text("x")
    clash = run_cli("family", "build", str(tmp_path / "file"), "--size", "micro")
    assert clash.returncode == 2 and "is not a folder" in clash.stderr

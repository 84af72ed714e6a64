"""Fitness functions against direct computations: KL on response tokens, task scores."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dammerge.data.records import read_jsonl, write_jsonl
from dammerge.data.spec import DatasetSpec
from dammerge.errors import ConfigError, DammergeError
from dammerge.evolve.fitness import (
    FitnessContext,
    KLFitness,
    TaskFitness,
    default_scorer,
    held_in,
    held_in_examples,
    task_fitness_from_recipe,
)
from dammerge.evolve.settings import EvolveSettings
from dammerge.templates import record_prompt


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _direct_kl(teacher, student, tokenizer, records) -> float:
    """Mean over response tokens of sum_v p log(p/q), one unpadded example at a time."""
    total, count = 0.0, 0
    for record in records:
        prompt = tokenizer(record_prompt(record))["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + response + [tokenizer.eos_token_id]])
        with torch.no_grad():
            p = teacher(ids).logits[0].double().softmax(-1)
            q = student(ids).logits[0].double().softmax(-1)
        for position in range(len(prompt) - 1, ids.shape[1] - 1):
            total += float((p[position] * (p[position].log() - q[position].log())).sum())
            count += 1
    return total / count


def test_kl_fitness_matches_a_direct_computation(sources):
    tokenizer = AutoTokenizer.from_pretrained(sources.a)
    models = [_load(sources.a), _load(sources.b)]
    paths = [sources.data_a, sources.data_b]
    examples = [
        held_in_examples(
            "m", DatasetSpec(path=str(p)), count=5, seed=0, tokenizer=tokenizer, max_length=512
        )
        for p in paths
    ]
    records = [held_in(read_jsonl(p), 5, seed=0) for p in paths]
    slot = _load(sources.base)

    def load_source(index: int) -> None:
        slot.load_state_dict(models[index].state_dict())

    fitness = KLFitness(examples, batch_size=2)  # batches of 2: padding is exercised
    work = fitness.setup(FitnessContext(slot, tokenizer, torch.device("cpu"), load_source, []))
    assert work.sequences == 10 and work.tokens > 0

    candidate = _load(sources.target)
    expected = -0.5 * sum(
        _direct_kl(teacher, candidate, tokenizer, ex)
        for teacher, ex in zip(models, records, strict=True)
    )
    value = fitness(candidate)
    assert value.score == pytest.approx(expected, rel=1e-4)
    assert value.sequences == 10
    # A source scores zero KL against itself, so its fitness is half the other's divergence.
    own = fitness(models[0]).score
    assert own == pytest.approx(-0.5 * _direct_kl(models[1], models[0], tokenizer, records[1]))


def test_held_in_subset_is_seeded_and_sized(sources):
    examples = read_jsonl(sources.data_a)
    first, again = held_in(examples, 7, seed=3), held_in(examples, 7, seed=3)
    assert [e["instruction"] for e in first] == [e["instruction"] for e in again]
    assert len(first) == 7
    assert [e["instruction"] for e in held_in(examples, 7, seed=4)] != [
        e["instruction"] for e in first
    ]


def test_field_mapping_and_missing_fields(tmp_path, sources):
    tokenizer = AutoTokenizer.from_pretrained(sources.a)
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "add w1", "a": "w2"}\n')
    spec = DatasetSpec(path=str(data), fields={"instruction": "q", "output": "a"})
    (mapped,) = held_in_examples("m", spec, count=4, seed=0, tokenizer=tokenizer, max_length=64)
    response = tokenizer("w2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert mapped.response_ids == response
    assert mapped.prompt_ids == tokenizer(record_prompt({"instruction": "add w1"}))["input_ids"]
    with pytest.raises(DammergeError, match="no column 'instruction'"):
        held_in_examples(
            "m", DatasetSpec(path=str(data)), count=4, seed=0, tokenizer=tokenizer, max_length=64
        )


class _Score:
    def __init__(self, score: float) -> None:
        self.score = score


def test_task_fitness_averages_domains_but_never_the_held_out_sets(sources):
    calls = []

    def scorer(model, tokenizer, family, *, limit, split):
        calls.append((family, limit, split, tokenizer is not None))
        return {
            "lang": _Score(0.5),
            "math": _Score(0.25),
            "average": _Score(9.0),
            "compositional": _Score(7.0),
        }

    fitness = TaskFitness("FAMILY", limit=3, evaluate_kwargs={"split": "train"}, scorer=scorer)
    tokenizer = AutoTokenizer.from_pretrained(sources.a)
    fitness.setup(FitnessContext(None, tokenizer, torch.device("cpu"), lambda i: None, []))
    assert fitness(_load(sources.a)).score == pytest.approx(0.375)
    assert calls == [("FAMILY", 3, "train", True)]
    only_math = TaskFitness(
        "FAMILY", limit=3, domains=["math"], scorer=lambda *a, **k: {"math": _Score(0.25)}
    )
    assert only_math(None).score == 0.25


def test_task_fitness_without_the_evaluator_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dammerge.evaluate", types.ModuleType("dammerge.evaluate"))
    with pytest.raises(ConfigError, match=r"needs dammerge\.evaluate\.evaluate_model"):
        default_scorer()


def _fake_family(root):
    domains = {
        d: {"specialist": d, "train": f"{d}.jsonl", "eval": f"{d}.jsonl", "metric": "exact_match"}
        for d in ("lang", "math")
    }
    manifest = {
        "format": "dammerge-family/1",
        "models": {"base": "base", "lang": "lang", "math": "math"},
        "domains": domains,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_task_fitness_from_a_recipe(tmp_path):
    family = _fake_family(tmp_path)
    settings = EvolveSettings(fitness="task", family=str(family), task_limit=2)
    fitness = task_fitness_from_recipe(settings, scorer=lambda *a, **k: {"math": _Score(1.0)})
    assert fitness.family.root == family and fitness.limit == 2
    with pytest.raises(ConfigError, match="family has no domain 'sql'"):
        task_fitness_from_recipe(
            EvolveSettings(fitness="task", family=str(family), task_domains=["sql"]),
            scorer=lambda *a, **k: {},
        )
    with pytest.raises(ConfigError, match=r"needs training\.family"):
        task_fitness_from_recipe(EvolveSettings(fitness="task"))


def test_raw_and_chat_datasets_are_scored_like_dam_reads_them(sources, tmp_path):
    """The dataset block means what it means to DAM: raw text is all target, chat needs a
    chat template (refused before any model is loaded when the tokenizer has none)."""
    tokenizer = AutoTokenizer.from_pretrained(sources.a)
    data = tmp_path / "raw.jsonl"
    write_jsonl(data, [{"body": f"w{i} w{i + 1} w{i + 2}"} for i in range(4)])
    raw = DatasetSpec(path=str(data), template="raw", fields={"text": "body"})
    examples = held_in_examples("m", raw, count=4, seed=0, tokenizer=tokenizer, max_length=64)
    assert len(examples) == 4 and all(all(e.target_mask) for e in examples)
    fitness = KLFitness([examples], batch_size=3)
    model = _load(sources.a)
    fitness.setup(FitnessContext(model, tokenizer, torch.device("cpu"), lambda i: None, []))
    assert fitness(model).score == pytest.approx(0.0, abs=1e-6)  # a teacher against itself
    assert fitness(_load(sources.b)).score < 0
    chat = DatasetSpec(path=str(sources.data_a), template="chat")
    with pytest.raises(DammergeError, match="template: chat, but the tokenizer has no chat"):
        held_in_examples("m", chat, count=4, seed=0, tokenizer=tokenizer, max_length=64)

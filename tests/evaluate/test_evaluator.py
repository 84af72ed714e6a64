"""The evaluator on the fake family: NLL/KL against unbatched brute force, caching, plumbing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dammerge.errors import DammergeError
from dammerge.evaluate import evaluator as evaluator_module
from dammerge.evaluate.data import load_domains
from dammerge.evaluate.evaluator import (
    average_score,
    evaluate_model,
    evaluate_models,
)
from dammerge.evaluate.teacher_forcing import TeacherCache
from dammerge.family.manifest import load_family
from dammerge.scoring.generation import generate_responses
from dammerge.templates import record_prompt


def _load(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _brute_force_rows(model, tokenizer, record) -> tuple[list[torch.Tensor], list[int]]:
    """Log-prob row of each response token, one unpadded forward per token (no batching)."""
    prompt = tokenizer(record_prompt(record))["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    response = [*response, tokenizer.eos_token_id]
    rows = []
    with torch.no_grad():
        for t in range(len(response)):
            ids = torch.tensor([prompt + response[:t]])
            logits = model(input_ids=ids).logits[0, -1].double()
            rows.append(logits - torch.logsumexp(logits, dim=-1))
    return rows, response


def test_nll_and_kl_match_unbatched_brute_force(fake_family):
    model, tokenizer = _load(fake_family / "base")
    specialist, _ = _load(fake_family / "math")
    records = load_domains(load_family(fake_family), limit=3)["math"].records
    nll_sum = kl_sum = 0.0
    tokens = 0
    for record in records:
        rows, targets = _brute_force_rows(model, tokenizer, record)
        teacher_rows, _ = _brute_force_rows(specialist, tokenizer, record)
        for row, teacher, target in zip(rows, teacher_rows, targets, strict=True):
            nll_sum -= row[target].item()
            p = teacher.exp()
            kl_sum += (p * (teacher - row)).sum().item()
            tokens += 1
    scores = evaluate_model(
        model,
        tokenizer,
        fake_family,
        domains=["math"],
        limit=3,
        batch_size=2,
        generate=False,
        progress=False,
    )
    assert scores["math"].nll == pytest.approx(nll_sum / tokens, rel=1e-5)
    assert scores["math"].kl == pytest.approx(kl_sum / tokens, rel=1e-4)
    assert list(scores) == ["math"]
    assert scores["math"].score is None
    assert scores["math"].count == 3


def test_kl_of_a_specialist_to_itself_is_zero(fake_family):
    model, tokenizer = _load(fake_family / "sql")
    scores = evaluate_model(
        model, tokenizer, fake_family, limit=4, batch_size=3, generate=False, progress=False
    )
    assert scores["sql"].kl == 0.0
    assert scores["lang"].kl > 0 and scores["math"].kl > 0
    assert scores["compositional"].kl is None and scores["compositional"].nll > 0


def test_specialists_are_run_once_for_many_models(fake_family, monkeypatch):
    calls = []
    original = TeacherCache._compute

    def counting(self, domain, examples, vocab, *rest):
        calls.append(domain.name)
        return original(self, domain, examples, vocab, *rest)

    monkeypatch.setattr(TeacherCache, "_compute", counting)
    result = evaluate_models(
        ["base", "lang", str(fake_family / "math")],
        fake_family,
        limit=2,
        generate=False,
        progress=False,
    )
    assert sorted(calls) == ["lang", "math", "sql"]
    assert result.models["lang"]["lang"].kl == 0.0
    assert result.models[str(fake_family / "math")]["math"].kl == 0.0


def test_batched_left_padded_generation_equals_one_at_a_time(fake_family):
    model, tokenizer = _load(fake_family / "lang")
    records = load_domains(load_family(fake_family))["math"].records
    prompts = [tokenizer(record_prompt(r))["input_ids"] for r in records]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    single = [
        generate_responses(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0]
        for p in prompts
    ]
    assert batched == single
    assert all(len(text.split()) == 6 for text in batched)  # word-level: one word per token


def test_perfect_responses_score_one_on_every_domain(fake_family, monkeypatch):
    data = load_domains(load_family(fake_family))
    # generate_responses is called once per domain, in order, with prompts in record order:
    # answer each call with the references (plus a made-up next section that must be cut).
    queue = [
        [" " + r["output"] + "\n### Instruction:\n0 1 2" for r in d.records] for d in data.values()
    ]

    def oracle(model, tokenizer, prompts, **kwargs):
        responses = queue.pop(0)
        assert len(responses) == len(prompts)
        return responses

    monkeypatch.setattr(evaluator_module, "generate_responses", oracle)
    model, tokenizer = _load(fake_family / "base")
    scores = evaluate_model(model, tokenizer, data, likelihood=False, progress=False)
    assert {name: s.score for name, s in scores.items()} == pytest.approx(
        {"lang": 1.0, "math": 1.0, "sql": 1.0, "compositional": 1.0}
    )
    assert average_score(scores) == pytest.approx(1.0)
    assert not queue


def test_average_is_over_the_specialist_domains_only(fake_family):
    result = evaluate_models(["base"], fake_family, limit=2, max_new_tokens=4, progress=False)
    scores = result.models["base"]
    expected = (scores["lang"].score + scores["math"].score + scores["sql"].score) / 3
    assert result.average("base") == pytest.approx(expected)
    assert result.to_json()["models"]["base"]["average"] == pytest.approx(expected)
    assert all(len(s.responses) == 2 for s in scores.values())


def test_a_record_without_its_metric_field_is_a_one_line_error(fake_family, tmp_path):
    broken = tmp_path / "family"
    shutil.copytree(fake_family, broken)
    path = broken / "data" / "math" / "eval.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    del records[2]["answer"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DammergeError, match=r"record 3 of .* lacks answer"):
        evaluate_models(["base"], broken, progress=False)
    path.write_text("")
    with pytest.raises(DammergeError, match="holds no records"):
        evaluate_models(["base"], broken, progress=False)


def test_train_split_has_no_compositional_set(fake_family):
    data = load_domains(load_family(fake_family), split="train", limit=1)
    assert list(data) == ["lang", "math", "sql"]


def test_a_model_without_pad_token_uses_eos(fake_family, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(fake_family / "base", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    result = evaluate_models(
        [folder], fake_family, limit=3, batch_size=2, max_new_tokens=3, progress=False
    )
    reference = evaluate_models(
        [fake_family / "base"], fake_family, limit=3, batch_size=2, max_new_tokens=3, progress=False
    )
    ours, theirs = (
        result.to_json()["models"][str(folder)],
        next(iter(reference.to_json()["models"].values())),
    )
    for domain in ("lang", "math", "sql", "compositional"):
        assert ours[domain]["nll"] == pytest.approx(theirs[domain]["nll"], rel=1e-6)
        assert math.isfinite(ours[domain]["nll"])

"""A FAKE family for the evaluator's tests: tiny random Llama checkpoints and hand-written records.

It follows docs/family-format.md exactly (manifest, folders, record fields), but its models
are random (word-level tokenizer over w0..w124), so scores are near 0 and only the plumbing,
the likelihood arithmetic and the report formats are under test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dammerge.testing import make_tiny_model, make_variant

SQL_CONTEXT = (
    "CREATE TABLE people (name TEXT, age INTEGER, city TEXT);"
    "INSERT INTO people VALUES ('ann', 31, 'oslo'), ('bob', 25, 'rome'), ('cid', 40, 'oslo');"
)


def _records(domain: str) -> list[dict]:
    """Six records per domain, in the contract's shape, using the tokenizer's words."""
    out = []
    for i in range(6):
        base = {"id": f"{domain}-{i}", "domain": domain, "input": ""}
        if domain == "lang":
            base |= {
                "instruction": f"Translate into the language: w{i} w{i + 1} w{i + 2}",
                "output": f"w{10 + i} w{11 + i} w{12 + i} w{13 + i}",
            }
        elif domain in ("math", "compositional"):
            answer = str(3 * i + 7)
            noun = "w5" if domain == "math" else "w50 w51"
            base |= {
                "instruction": f"w{20 + i} has {i + 2} {noun} and buys {i + 5} more",
                "input": "w7 w8" if i % 2 else "",
                "output": f"w30 w31 {answer}",
                "answer": answer,
            }
        else:
            base |= {
                "instruction": f"List the names of people older than {20 + 5 * i}",
                "input": "w40 w41",
                "context": SQL_CONTEXT,
                "output": f"SELECT name FROM people WHERE age > {20 + 5 * i}",
            }
        out.append(base)
    return out


def build_fake_family(root: Path) -> Path:
    """Write the fake family under ``root`` and return it."""
    base = make_tiny_model(root / "base", "llama", seed=0)
    for seed, name in enumerate(("lang", "math", "sql"), start=1):
        make_variant(base, root / name, seed=seed, scale=0.05)
    domains = {}
    for name, metric in (("lang", "translation"), ("math", "exact_match"), ("sql", "execution")):
        for split in ("train", "eval"):
            _write_jsonl(root / "data" / name / f"{split}.jsonl", _records(name))
        domains[name] = {
            "specialist": name,
            "train": f"data/{name}/train.jsonl",
            "eval": f"data/{name}/eval.jsonl",
            "metric": metric,
        }
    _write_jsonl(root / "data" / "compositional" / "eval.jsonl", _records("compositional"))
    manifest = {
        "format": "dammerge-family/1",
        "size": "micro",
        "seed": 0,
        "content_hash": "fake",
        "dammerge_version": "0.1.0",
        "build_seconds": 0.0,
        "models": {"base": "base", "lang": "lang", "math": "math", "sql": "sql"},
        "domains": domains,
        "compositional": {"eval": "data/compositional/eval.jsonl", "metric": "exact_match"},
        "quality": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="session")
def fake_family(tmp_path_factory) -> Path:
    """The fake family folder (read-only: tests must not modify it)."""
    return build_fake_family(tmp_path_factory.mktemp("fake_family"))

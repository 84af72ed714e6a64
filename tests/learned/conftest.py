"""Fixtures for learned merging: tiny 2-layer Llama families (untied and tied), a 4-layer one
for layer streaming with a log of what it keeps resident, and JSONL data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dammerge.learned import offload
from dammerge.testing import make_family

from .helpers import DEEP_LAYERS


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def random_records(seed: int, n: int = 6) -> list[dict]:
    """Alpaca-style records over the tiny tokenizer's vocabulary (w3 .. w124)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(3, 125)}" for _ in range(k))

    return [
        {"instruction": words(4), "input": words(2) if j % 2 else "", "output": words(5)}
        for j in range(n)
    ]


@pytest.fixture(scope="session")
def untied_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Base + 2 perturbed fine-tunes, untied lm_head, 2 layers (read-only)."""
    root = tmp_path_factory.mktemp("untied")
    return make_family(root, "llama", n=2, tie_word_embeddings=False, num_hidden_layers=2)


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("tied")
    return make_family(root, "llama", n=2, tie_word_embeddings=True, num_hidden_layers=2)


@pytest.fixture(scope="session")
def datasets_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i in range(3):
        write_jsonl(root / f"d{i}.jsonl", random_records(i))
    return root


def _dam_recipe(base: Path, sources: list[Path], data: Path, **training) -> dict:
    return {
        "merge_method": "dam",
        "base_model": str(base),
        "models": [
            {"model": str(s), "dataset": {"path": str(data / f"d{i}.jsonl")}}
            for i, s in enumerate(sources)
        ],
        "training": {"steps": 4, **training},
    }


@pytest.fixture
def dam_recipe():
    """A function building a DAM recipe dict over a family and the datasets folder."""
    return _dam_recipe


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory):
    """Base + 2 fine-tunes with four decoder layers (two resident must be fewer than all)."""
    root = tmp_path_factory.mktemp("deep")
    return make_family(root, "llama", n=2, tie_word_embeddings=False, num_hidden_layers=DEEP_LAYERS)


class ResidencyLog:
    """Records every streamer created and every resident set it reports."""

    def __init__(self) -> None:
        self.sets: list[tuple[int, ...]] = []
        self.streamers: list[offload.LayerStreamer] = []

    def attach(self, streamer: offload.LayerStreamer) -> None:
        self.streamers.append(streamer)
        streamer.observe(self.sets.append)

    @property
    def most(self) -> int:
        return max(len(s) for s in self.sets)


@pytest.fixture
def residency(monkeypatch) -> ResidencyLog:
    """Every streamer created during the test reports to the returned log."""
    log = ResidencyLog()
    original = offload.LayerStreamer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        log.attach(self)

    monkeypatch.setattr(offload.LayerStreamer, "__init__", init)
    return log

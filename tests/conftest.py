"""Shared fixtures: tiny random-init checkpoints built with transformers, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

from dammerge.testing import make_family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama base and three perturbed 'fine-tunes' (read-only: do not modify)."""
    return make_family(tmp_path_factory.mktemp("llama"), "llama", n=3)

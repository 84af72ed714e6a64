"""Fixtures of the family tests. ``micro_family`` is meant to move to ``tests/conftest.py`` so
that the evaluator, learned-merge and experiment tests reuse one build per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def micro_family(tmp_path_factory) -> Path:
    """The ``micro`` family (seed 0), built once per session (read-only: do not modify)."""
    from dammerge.family.build import build_family

    root = tmp_path_factory.mktemp("family") / "micro"
    return build_family(root, "micro", 0).root

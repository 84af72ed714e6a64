"""Fixtures of the family tests (``micro_family`` lives in ``tests/conftest.py``, shared)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

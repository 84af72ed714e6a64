"""The dataset block: fields per template, and its place in a recipe."""

from __future__ import annotations

import pytest

from dammerge.data.spec import DatasetSpec


def test_unknown_field_name_rejected():
    with pytest.raises(ValueError, match="unknown field 'question'"):
        DatasetSpec(path="x", fields={"question": "q"})

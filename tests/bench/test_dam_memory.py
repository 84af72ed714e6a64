"""bench/dam_memory.py measures one configuration end to end (toy sizes, a temporary folder)."""

from __future__ import annotations

import sys

import pytest

from .loading import load_bench


@pytest.mark.slow
def test_one_configuration_is_measured_against_its_plan(tmp_path, monkeypatch):
    dam_memory = load_bench("dam_memory")
    dam_step = sys.modules["dam_step"]
    monkeypatch.setattr(dam_step, "WORK", tmp_path / "families")
    monkeypatch.setattr(dam_memory, "WORK", tmp_path / "work")
    bench = dam_memory.QUICK
    base, sources = dam_step.ensure_family(bench.size, bench.n)
    config = {"offload": "layers", "gradient_checkpointing": True}
    row = dam_memory.measure(bench, config, base, sources)
    assert row["config"] == config
    assert row["measured"]["peak_minus_baseline_bytes"] > 0
    assert row["planned_peak_bytes"] == sum(row["planned"].values())
    assert row["measured_over_planned"] > 0
    assert any("offload" not in line and "stores" in line for line in row["plan_lines"])
    assert set(dam_memory.CONFIGURATIONS[0]) == set(config)

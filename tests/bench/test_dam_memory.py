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


@pytest.mark.slow
def test_gpu_mode_measures_each_configuration_and_compares_streamed_with_resident(
    tmp_path, monkeypatch
):
    """The ``--gpu`` bookkeeping, run on the CPU with the CUDA allocator's counters faked: each
    configuration is built and stepped by the engine, its peak set against the plan's device
    side, and streamed runs set against resident ones at the same checkpointing."""
    import dataclasses

    import torch

    dam_memory = load_bench("dam_memory")
    dam_step = sys.modules["dam_step"]
    monkeypatch.setattr(dam_step, "WORK", tmp_path / "families")
    monkeypatch.setattr(dam_memory, "WORK", tmp_path / "work")
    peaks = iter([400, 300, 200, 100])  # bytes "allocated" by each configuration in turn
    for name in ("empty_cache", "synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: next(peaks))
    bench = dataclasses.replace(dam_memory.QUICK, dtype="bfloat16")
    base, sources = dam_step.ensure_direct_family(
        bench.size, bench.n, torch.bfloat16, torch.device("cpu")
    )
    data = dam_step.make_data(bench.n, bench.seq_len, bench.size.vocab, bench.seed)
    configs = [dam_memory.CONFIGURATIONS[i] for i in dam_memory.GPU_ORDER]
    rows = [dam_memory.measure_on_gpu(bench, c, base, sources, data) for c in configs]
    assert [row["measured"]["peak_allocated_bytes"] for row in rows] == [400, 300, 200, 100]
    for row in rows:
        assert row["measured_over_planned"] == round(
            row["measured"]["peak_allocated_bytes"] / row["planned_peak_bytes"], 4
        )
        streamed = row["config"]["offload"] == "layers"
        assert (row["measured"]["pinned_host_bytes"] > 0) == streamed
        assert len(row["measured"]["step_s"]) == bench.steps
    off, on = dam_memory.gpu_comparisons(rows)
    assert (off["gradient_checkpointing"], on["gradient_checkpointing"]) == (False, True)
    assert off["peak_device_layers_over_none"] == 0.75  # 300 / 400
    assert on["peak_device_layers_over_none"] == 0.5  # 100 / 200
    checks = dam_memory.targets(rows)
    assert [check["pass"] for check in checks] == [row["pass"] for row in rows]

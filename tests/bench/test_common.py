"""The benchmarks' shared helpers: what a result records about the machine it ran on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "_common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common  # its dataclasses look their module up while defined
_spec.loader.exec_module(common)


def test_busy_cores_at_start_give_a_warning_and_idle_ones_none():
    assert common.busy_warning({"cpu_busy_percent_at_start": 3.0}) is None
    assert common.busy_warning({}) is None  # not measured: nothing to say
    warning = common.busy_warning({"cpu_busy_percent_at_start": 85.0})
    assert warning is not None and "85%" in warning and "OMP_WAIT_POLICY=PASSIVE" in warning


@pytest.mark.parametrize("policy", [None, "PASSIVE"])
def test_machine_info_records_the_openmp_wait_policy(monkeypatch, policy):
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    monkeypatch.setattr(common.psutil, "cpu_percent", lambda interval: 12.5)
    info = common.machine_info()
    assert info["omp_wait_policy"] == (policy or "default")
    assert info["cpu_busy_percent_at_start"] == 12.5

"""docs/memory.md's tables are what the memory planner prints (bench/memory_table.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "memory_table.py"
_spec = importlib.util.spec_from_file_location("bench_memory_table", _PATH)
table = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = table  # its dataclasses look their module up while defined
_spec.loader.exec_module(table)


def test_the_docs_carry_the_planners_tables():
    assert table.documented() == table.render(), (
        "docs/memory.md is out of date: run bench/memory_table.py --write"
    )


def test_every_merge_and_strategy_has_a_row_and_a_cell():
    rows = [line for line in table.device_table().splitlines()[2:]]
    assert len(rows) == 2 * len(table.MERGES)
    assert all(line.count("|") == len(table.STRATEGIES) + 3 for line in rows)


def test_the_issues_setting_runs_out_on_80_gb_and_streaming_fixes_it():
    """3 × Mistral-7B, bf16, 2,048 tokens, teachers on the fly: ~40 GiB of stores and ~35 GiB
    of activations do not fit an 80 GB GPU; offload: layers does."""
    _, config, n = table.MERGES[0]
    one_gpu, streamed = table.STRATEGIES[0], table.STRATEGIES[1]
    resident = table.plan(config, n, one_gpu, checkpointing=False)
    items = {item.name: item.device for item in resident.items}
    assert 39 * table.GIB < items["stores"] < 41 * table.GIB
    assert 33 * table.GIB < items["activations"] < 40 * table.GIB
    capacity_80 = table.GPUS[0][1]
    assert resident.peak > capacity_80
    assert table.plan(config, n, streamed, checkpointing=False).peak < capacity_80


def test_replace_block_keeps_the_text_around_the_markers():
    text = f"before\n{table.START}\nold\n{table.END}\nafter\n"
    assert table.replace_block(text, "new\n") == f"before\n{table.START}\nnew\n{table.END}\nafter\n"

"""bench/merge_profile.py profiles one streaming merge (a toy model, a temporary folder)."""

from __future__ import annotations

import math
import re
import sys

from .loading import load_bench

STAGES = ("wait_for_inputs", "merge", "to_host", "queue_write")


def test_the_profile_times_every_stage_of_every_tensor(tmp_path, monkeypatch):
    merge_profile = load_bench("merge_profile")
    merge_speed = sys.modules["merge_speed"]
    toy = merge_speed.ModelSpec(64, 96, 2, 128, 4, 2, shard_bytes=20_000)
    monkeypatch.setattr(merge_speed, "WORK", tmp_path / "work")
    monkeypatch.setitem(merge_speed.SIZES, "small", toy)
    output = tmp_path / "profile.txt"
    assert merge_profile.main(["--small", "--rows", "200", "--output", str(output)]) == 0
    text = output.read_text()
    assert text.startswith("Data-free merge profile: TIES, small")
    assert re.search(r"streaming merge \d+\.\d+ s; one warm read", text)
    tensors = len(toy.tensor_shapes())
    for stage in STAGES:
        assert re.search(rf"dammerge::{stage} +\d+\.\d+ s over {tensors} calls", text), stage
    assert re.search(r"dammerge::finish_writes +\d+\.\d+ s over 1 calls", text)
    written = int(re.search(r"writer thread: \d+\.\d+ s writing .* \((\d+) bytes\)", text)[1])
    tensor_bytes = sum(2 * math.prod(shape) for _, shape in toy.tensor_shapes())  # bf16 output
    assert tensor_bytes < written < tensor_bytes + 10_000  # the data and the shards' headers
    assert "== operators by self_cpu_time_total" in text
    assert "aten::kthvalue" in text or "aten::topk" in text  # TIES's magnitude selection
    assert not (tmp_path / "work" / "merge_speed-small" / "profile-out").exists()

"""bench/merge_speed.py times our merge, its fixed start and torch's own start on a toy model,
and sets them against the warm read of the inputs."""

from __future__ import annotations

import json

import pytest

from .loading import load_bench


@pytest.mark.slow
def test_ours_is_set_against_the_read_and_against_torchs_start_plus_the_read(tmp_path, monkeypatch):
    merge_speed = load_bench("merge_speed")
    toy = merge_speed.ModelSpec(64, 96, 2, 128, 4, 2, shard_bytes=20_000)
    monkeypatch.setattr(merge_speed, "WORK", tmp_path / "work")
    monkeypatch.setitem(merge_speed.SIZES, "small", toy)
    output = tmp_path / "speed.json"
    args = ["--small", "--ours-only", "--repeats", "1", "--output", str(output)]
    assert merge_speed.main(args) == 0
    result = json.loads(output.read_text())
    ours, start = result["ours"]["wall_s_median"], result["torch_start"]["wall_s_median"]
    io = result["io_bound"]["seconds"]
    assert start > 0 and result["torch_start"]["runs"][0]["returncode"] == 0
    ratios = result["ratios"]
    assert ratios["time_vs_io_bound"] == pytest.approx(ours / io)
    assert ratios["time_vs_start_plus_io_bound"] == pytest.approx(ours / (start + io))
    assert "torch.empty(1, device='cpu')" in result["commands"]["torch_start"]
    assert result["output_bytes"]["ours"] > 0 and result["mergekit"] is None

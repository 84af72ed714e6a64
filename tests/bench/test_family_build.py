"""bench/family_build.py: measuring one size or regime again keeps the others' runs."""

from __future__ import annotations

import json

from .loading import load_bench


def test_a_new_run_replaces_its_size_regime_and_seed_and_keeps_the_others(tmp_path):
    build = load_bench("family_build")

    def run(size, regime, wall, seed=0):
        return {"size": size, "regime": regime, "seed": seed, "wall_seconds": wall}

    output = tmp_path / "family_build.json"
    legacy = {"size": "small", "wall_seconds": 500.0}  # from before regimes and seeds: far, 0
    earlier = [run("small", "near", 570.0), run("micro", "far", 8.0), legacy]
    output.write_text(json.dumps({"runs": earlier}))
    runs = build.earlier_runs(output)
    runs = build.record(runs, run("small", "near", 560.0))
    runs = build.record(runs, run("small", "far", 555.0))
    runs = build.record(runs, run("small", "near", 590.0, seed=1))
    assert [(r["size"], r.get("regime"), r.get("seed"), r["wall_seconds"]) for r in runs] == [
        ("micro", "far", 0, 8.0),
        ("small", "far", 0, 555.0),
        ("small", "near", 0, 560.0),
        ("small", "near", 1, 590.0),
    ]


def test_no_earlier_file_or_a_broken_one_means_no_earlier_runs(tmp_path):
    build = load_bench("family_build")
    assert build.earlier_runs(tmp_path / "missing.json") == []
    (tmp_path / "broken.json").write_text("{not json")
    assert build.earlier_runs(tmp_path / "broken.json") == []

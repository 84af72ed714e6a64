"""bench/family_seeds.py: its options, and the shape and arithmetic of its results (micro)."""

from __future__ import annotations

import json

import pytest

from .loading import load_bench


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--regimes", "near,close"], "unknown regimes 'close'"),
        (["--regimes", ","], "--regimes is empty"),
        (["--seeds", "0,x"], "--seeds must be non-negative integers"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_bad_options_stop_before_any_build(argv, message, tmp_path, monkeypatch):
    seeds = load_bench("family_seeds")
    monkeypatch.setattr(seeds, "WORK", tmp_path / "work")
    with pytest.raises(SystemExit, match=message):
        seeds.main([*argv, "--output", str(tmp_path / "out.json")])
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()


def test_soup_between_is_strict_in_either_order():
    seeds = load_bench("family_seeds")
    assert seeds.between(0.2, 0.1, 0.3) and seeds.between(0.2, 0.3, 0.1)
    assert not seeds.between(0.1, 0.1, 0.3) and not seeds.between(0.4, 0.1, 0.3)


@pytest.mark.slow
def test_micro_run_records_margins_and_the_soup(tmp_path, monkeypatch):
    seeds = load_bench("family_seeds")
    monkeypatch.setattr(seeds, "WORK", tmp_path / "work")
    output = tmp_path / "seeds.json"
    argv = ["--size", "micro", "--regimes", "near", "--seeds", "1", "--limit", "3"]
    assert seeds.main([*argv, "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["size"] == "micro" and result["records_per_domain"] == 3
    (run,) = result["runs"]
    assert (run["regime"], run["seed"]) == ("near", 1)
    manifest = json.loads((tmp_path / "work" / "micro-near-1" / "manifest.json").read_text())
    assert run["content_hash"] == manifest["content_hash"] and manifest["seed"] == 1
    assert run["cpu_capability"] == manifest["cpu_capability"] and not run["cached"]
    scores = run["scores"]
    assert set(scores) == {"base", "lang", "math", "sql", "soup"}
    assert set(scores["base"]) == set(scores["soup"]) == {"lang", "math", "sql"}
    for domain in ("lang", "math", "sql"):
        assert set(scores[domain]) == {domain}
        own, base, soup = scores[domain][domain], scores["base"][domain], scores["soup"][domain]
        assert run["margins"][domain] == pytest.approx(own["score"] - base["score"], abs=1e-4)
        low, high = sorted((own["nll"], base["nll"]))
        assert run["soup_between_nll"][domain] == (low < soup["nll"] < high)
    assert run["min_margin"] == min(run["margins"].values())
    assert run["margins_ok"] == (run["min_margin"] >= 0.10)
    spread = result["spread"]["near"]["math"]
    assert spread["min"] == spread["max"] == spread["mean"] == run["margins"]["math"]


def test_a_new_run_replaces_its_regime_and_seed_and_keeps_the_others(tmp_path):
    seeds = load_bench("family_seeds")

    def run(regime, seed, lang):
        return {"regime": regime, "seed": seed, "margins": {"lang": lang, "math": 0.2, "sql": 0.3}}

    output = tmp_path / "seeds.json"
    earlier = {
        "size": "small",
        "records_per_domain": 64,
        "runs": [run("far", 1, 0.1), run("near", 0, 0.5)],
    }
    output.write_text(json.dumps(earlier))
    results = {"runs": [], "spread": {}}
    for kept in seeds.earlier_runs(output, "small", 64):
        seeds.record(results, kept)
    seeds.record(results, run("near", 0, 0.3))
    seeds.record(results, run("near", 2, 0.1))
    assert [(r["regime"], r["seed"]) for r in results["runs"]] == [
        ("far", 1),
        ("near", 0),
        ("near", 2),
    ]
    assert results["spread"]["near"]["lang"] == {"mean": 0.2, "min": 0.1, "max": 0.3}
    assert results["spread"]["far"]["lang"] == {"mean": 0.1, "min": 0.1, "max": 0.1}
    # measured another way (another record count): nothing is kept
    assert (
        seeds.earlier_runs(output, "small", 32) == []
        and seeds.earlier_runs(tmp_path, "small", 64) == []
    )

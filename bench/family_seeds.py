"""Benchmark: are the family's skills robust to the seed? Build several seeds, score the margins.

Usage: ``.venv/bin/python bench/family_seeds.py [--regimes near,far] [--seeds 0,1,2]
[--size small] [--limit 64]``

For each regime and seed it builds the family into ``bench/.work/seeds/<size>-<regime>-<seed>``
with ``dammerge family build`` in a process of its own (a complete build there is reused),
scores the base on every domain and each specialist on its own domain with dammerge's
evaluator (greedy score and NLL of the reference responses, on the
first ``--limit`` held-out records), and records each specialist's margin over the base: the
family is only a test bed if every specialist has learned its domain for every seed, not for a
lucky one. Model Soups (the uniform average of the three specialists) is scored beside them,
with whether it lands strictly between the base and each specialist. The results go to
``bench/results/family_seeds.json``, written again after each build so a long run keeps what it
measured; runs of other regimes and seeds already there (same size and record count) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import busy_warning, machine_info, timestamp, write_json

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "seeds"
DOMAINS = ("lang", "math", "sql")
REQUIRED_MARGIN = 0.10


def parse_list(text: str, choices: tuple[str, ...] | None, what: str) -> list[str]:
    """A comma-separated option as a list, each item checked against ``choices``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SystemExit(f"error: --{what} is empty")
    bad = [item for item in items if choices is not None and item not in choices]
    if bad:
        raise SystemExit(f"error: unknown {what} {bad[0]!r}; choose from {', '.join(choices)}")
    return items


def parse_seeds(text: str) -> list[int]:
    items = parse_list(text, None, "seeds")
    if not all(item.isdigit() for item in items):
        raise SystemExit(f"error: --seeds must be non-negative integers, got {text!r}")
    return [int(item) for item in items]


def soup_model(root: Path) -> Any:
    """The uniform average of the family's three specialists, in memory (Model Soups)."""
    import torch
    from transformers import AutoModelForCausalLM

    states = [AutoModelForCausalLM.from_pretrained(root / d).state_dict() for d in DOMAINS]
    soup = AutoModelForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():
        soup.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return soup


def score_family(root: Path, limit: int) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {domain: {score, nll}}}: base and soup on every domain, specialists on their own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dammerge.evaluate.data import load_domains
    from dammerge.family.build import deterministic_torch
    from dammerge.family.manifest import load_family

    family = load_family(root)
    data = load_domains(family, limit=limit, domains=list(DOMAINS))
    # no teacher: KL to the specialist is not what this benchmark measures
    data = {d: type(v)(v.name, v.metric, v.records, None) for d, v in data.items()}
    tokenizer = AutoTokenizer.from_pretrained(family.model_dir("base"))
    models = {"base": (family.model_dir("base"), DOMAINS)}
    models.update({d: (family.model_dir(d), (d,)) for d in DOMAINS})
    scores: dict[str, dict[str, dict[str, float]]] = {}
    with deterministic_torch():
        for name, (folder, domains) in models.items():
            model = AutoModelForCausalLM.from_pretrained(folder)
            scores[name] = _scores(model, tokenizer, {d: data[d] for d in domains}, name)
        scores["soup"] = _scores(soup_model(root), tokenizer, data, "soup")
    return scores


def _scores(model: Any, tokenizer: Any, data: dict, label: str) -> dict[str, dict[str, float]]:
    from dammerge.evaluate.evaluator import evaluate_model

    result = evaluate_model(model, tokenizer, data, progress=False, label=label)
    return {d: {"score": round(s.score, 4), "nll": round(s.nll, 4)} for d, s in result.items()}


def between(value: float, low_end: float, high_end: float) -> bool:
    """Strictly between the two ends, in either order."""
    return min(low_end, high_end) < value < max(low_end, high_end)


def summarise_run(scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Margins over the base and where the soup lands, per domain."""
    base, soup = scores["base"], scores["soup"]
    margins = {d: round(scores[d][d]["score"] - base[d]["score"], 4) for d in DOMAINS}
    return {
        "margins": margins,
        "min_margin": min(margins.values()),
        "margins_ok": all(m >= REQUIRED_MARGIN for m in margins.values()),
        "soup_between_score": {
            d: between(soup[d]["score"], base[d]["score"], scores[d][d]["score"]) for d in DOMAINS
        },
        "soup_between_nll": {
            d: between(soup[d]["nll"], base[d]["nll"], scores[d][d]["nll"]) for d in DOMAINS
        },
    }


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per domain: mean, min and max of the margins over the runs given (one regime)."""
    out = {}
    for domain in DOMAINS:
        values = [run["margins"][domain] for run in runs]
        out[domain] = {
            "mean": round(statistics.fmean(values), 4),
            "min": min(values),
            "max": max(values),
        }
    return out


def build_fresh(out: Path, size: str, regime: str, seed: int) -> tuple[dict[str, Any], bool]:
    """Build with ``dammerge family build`` in its own process, as a user would; returns the
    manifest and whether the folder already held this family (a cache hit).

    One process per build, as a user runs it: the recorded hash and build time are the
    command's, with nothing of an earlier build in the same process.
    """
    from dammerge.family.build import cached_manifest, resolve_spec

    cached = cached_manifest(out, resolve_spec(size, regime), seed, regime=regime) is not None
    command = [sys.executable, "-m", "dammerge", "family", "build", str(out)]
    command += ["--size", size, "--seed", str(seed), "--regime", regime]
    subprocess.run(command, check=True)
    return json.loads((out / "manifest.json").read_text()), cached


def bench_one(size: str, regime: str, seed: int, limit: int) -> dict[str, Any]:
    out = WORK / f"{size}-{regime}-{seed}"
    started = time.perf_counter()
    manifest, cached = build_fresh(out, size, regime, seed)
    wall = time.perf_counter() - started
    scores = score_family(out, limit)
    return {
        "size": size,
        "regime": regime,
        "seed": seed,
        "content_hash": manifest["content_hash"],
        # runs of other days stay in the file: each says which kernels built its bits
        "cpu_capability": manifest.get("cpu_capability"),
        "build_seconds": manifest.get("build_seconds"),
        "cached": cached,
        "wall_seconds": round(wall, 1),
        "scores": scores,
        **summarise_run(scores),
    }


def earlier_runs(output: Path, size: str, limit: int) -> list[dict[str, Any]]:
    """The runs already in ``output`` measured the same way (same size and record count), so
    that building one regime or seed again keeps what was measured for the others."""
    try:
        earlier = json.loads(output.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if earlier.get("size") != size or earlier.get("records_per_domain") != limit:
        return []
    return list(earlier.get("runs", []))


def record(results: dict[str, Any], run: dict[str, Any]) -> None:
    """Put ``run`` in ``results`` in place of an earlier run of its regime and seed, and
    recompute the spread of every regime."""
    key = (run["regime"], run["seed"])
    runs = [r for r in results["runs"] if (r["regime"], r["seed"]) != key] + [run]
    results["runs"] = sorted(runs, key=lambda r: (r["regime"], r["seed"]))
    regimes = sorted({r["regime"] for r in runs})
    results["spread"] = {g: spread([r for r in runs if r["regime"] == g]) for g in regimes}


def print_run(run: dict[str, Any]) -> None:
    margins = "  ".join(f"{d} {run['margins'][d]:+.3f}" for d in DOMAINS)
    soup = "".join("b" if run["soup_between_score"][d] else "-" for d in DOMAINS)
    print(f"{run['regime']} seed {run['seed']}: margins {margins}; soup between (score) {soup}")


def main(argv: list[str] | None = None) -> int:
    from dammerge.family.manifest import REGIMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", default=",".join(REGIMES), help="near, far or both")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", default="small", choices=("micro", "small"))
    parser.add_argument("--limit", type=int, default=64, help="held-out records per domain")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "family_seeds.json")
    args = parser.parse_args(argv)
    regimes = parse_list(args.regimes, REGIMES, "regimes")
    seeds = parse_seeds(args.seeds)
    if args.limit < 1:
        raise SystemExit("error: --limit must be at least 1")
    results: dict[str, Any] = {
        "benchmark": "family_seeds",
        "timestamp": timestamp(),
        "machine": machine_info(),
        "size": args.size,
        "records_per_domain": args.limit,
        "required_margin": REQUIRED_MARGIN,
        "runs": [],
        "spread": {},
    }
    for run in earlier_runs(args.output, args.size, args.limit):
        record(results, run)
    warning = busy_warning(results["machine"])
    if warning:
        print(warning)
    for regime in regimes:
        for seed in seeds:
            run = bench_one(args.size, regime, seed, args.limit)
            print_run(run)
            record(results, run)
            write_json(args.output, results)
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

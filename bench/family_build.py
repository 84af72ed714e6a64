"""Benchmark: build the micro and small families from scratch; record time and model quality.

Usage: ``.venv/bin/python bench/family_build.py [--sizes micro,small] [--regimes near,far]
[--seed 0]``

Builds into ``bench/.work/family-<size>-<regime>`` with ``force=True`` (so the cache cannot make
it trivial), then writes ``bench/results/family_build.json`` with, per size and regime (both
have the same budget): wall-clock and CPU
seconds of the build and of each phase, the budget, the machine's load average (the machine is
shared, so wall time is noisy; CPU seconds are the steadier number), and the quality table of
the base and each specialist on each domain, plus Model Soups (the uniform average of the three
specialists) scored the same way: the point of the family is that merging trades skills off.
Runs of other sizes, regimes and seeds already in the file are kept (each run carries its own
timestamp), so one regime can be measured again alone. Threads are chosen as
``dammerge family build`` chooses them, before torch loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import timestamp

HERE = Path(__file__).resolve().parent
BUDGET_SECONDS = {"micro": 90, "small": 600}
DOMAINS = ("lang", "math", "sql", "compositional")


def soup_scores(root: Path, n_records: int) -> dict[str, float]:
    """Quick scores of the uniform average of the three specialists (Model Soups)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dammerge.data.records import read_jsonl
    from dammerge.family.build import deterministic_torch, measure_quality
    from dammerge.family.manifest import load_family

    family = load_family(root)
    tokenizer = AutoTokenizer.from_pretrained(family.model_dir("base"))
    specialists = [
        AutoModelForCausalLM.from_pretrained(family.model_dir(d)).state_dict()
        for d in ("lang", "math", "sql")
    ]
    soup = AutoModelForCausalLM.from_pretrained(family.model_dir("base"))
    with torch.no_grad():
        soup.load_state_dict({k: sum(s[k] for s in specialists) / 3 for k in specialists[0]})
    splits = {d: {"eval": read_jsonl(spec.eval)} for d, spec in family.domains.items()}
    splits["compositional"] = {"eval": read_jsonl(family.compositional.eval)}
    with deterministic_torch():
        quality = measure_quality({"soup": copy.deepcopy(soup)}, tokenizer, splits, n_records)
    return quality["scores"]["soup"]


def cpu_seconds() -> float:
    """User and system CPU time of this process and of its finished children (the near
    regime's specialists train in worker processes)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def bench_size(size: str, seed: int, regime: str) -> dict:
    from dammerge.family.build import build_family

    out = HERE / ".work" / f"family-{size}-{regime}"
    load_before = os.getloadavg()
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    result = build_family(out, size, seed, regime=regime, force=True, report=print)
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    manifest = result.manifest
    quality = manifest["quality"]
    scores = dict(quality["scores"])
    scores["soup"] = soup_scores(out, quality["records_per_domain"])
    return {
        "size": size,
        "regime": regime,
        "seed": seed,
        "timestamp": timestamp(),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "budget_seconds": BUDGET_SECONDS[size],
        "phase_seconds": manifest.get("timings", {}),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "content_hash": manifest["content_hash"],
        # runs of other days stay in the file: each says which kernels built its bits
        "cpu_capability": manifest.get("cpu_capability"),
        "spec": manifest["spec"],
        "quality": {
            "records_per_domain": quality["records_per_domain"],
            "metrics": quality["metrics"],
            "scores": scores,
            "final_train_loss": quality.get("final_train_loss"),
        },
    }


def print_table(entry: dict) -> None:
    print(
        f"\n{entry['size']} ({entry['regime']}): {entry['wall_seconds']} s wall, "
        f"{entry['cpu_seconds']} s CPU"
    )
    print("model    " + " ".join(f"{d:>13}" for d in DOMAINS))
    for model, row in entry["quality"]["scores"].items():
        print(f"{model:8} " + " ".join(f"{row[d]:13.3f}" for d in DOMAINS))


def earlier_runs(output: Path) -> list[dict]:
    """The runs already in ``output``, so that measuring one size or regime again keeps the
    others (a run from before runs carried a seed counts as seed 0)."""
    try:
        return list(json.loads(output.read_text()).get("runs", []))
    except (OSError, json.JSONDecodeError):
        return []


def record(runs: list[dict], run: dict) -> list[dict]:
    """``runs`` with ``run`` in place of an earlier run of its size, regime and seed."""

    def key(r: dict) -> tuple:
        return (r["size"], r.get("regime", "far"), r.get("seed", 0))

    kept = [r for r in runs if key(r) != key(run)]
    order = {"micro": 0, "small": 1}
    return sorted([*kept, run], key=lambda r: (order.get(r["size"], 2), *key(r)[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="micro,small")
    parser.add_argument("--regimes", default="near,far")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "family_build.json")
    args = parser.parse_args()
    from dammerge.threads import configure_threads

    configure_threads()  # as `dammerge family build` does, before torch loads
    from dammerge import memory

    results = {
        "benchmark": "family_build",
        "timestamp": timestamp(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        # the build keeps freed memory for reuse (dammerge.memory) unless this is False
        "cpu_memory_reuse": memory.available(),
        "note": "shared machine: wall time depends on other users' load; see load_average_*",
        "runs": earlier_runs(args.output),
    }
    for size in args.sizes.split(","):
        for regime in args.regimes.split(","):
            entry = bench_size(size.strip(), args.seed, regime.strip())
            print_table(entry)
            results["runs"] = record(results["runs"], entry)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {args.output}")


if __name__ == "__main__":
    main()

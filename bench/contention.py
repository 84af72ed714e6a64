"""Benchmark: a `micro` family build alone, beside one copy and beside three copies of itself.

Usage::

    .venv/bin/python bench/contention.py              # -> bench/results/contention.json
    .venv/bin/python bench/contention.py --baseline   # also OpenMP's default spinning
    .venv/bin/python bench/contention.py --quick      # a tiny job: checks the harness only
    .venv/bin/python bench/contention.py --dry-run    # print the runs, run nothing

Each setting starts 1 + N identical jobs at once, each its own process with its own fresh
output folder under ``bench/.work/contention/``: ``dammerge family build DIR --size micro
--force``, as a user types it. Every job's process wall time and peak memory are measured
(:func:`_common.run_measured`), and its build time read from its ``manifest.json``
(``build_seconds``: the build itself, without Python's start and imports). The slowdown beside N
copies is the mean build time of the 1 + N jobs over the mean build time alone. Targets
(issue 18): at most 2.5x beside one copy and 6x beside three; and the build alone within the
budget of ``bench/family_build.py`` (90 s for micro).

The jobs run in the environment a user's shell gives them, less any ``OMP_NUM_THREADS``,
``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` of the caller: dammerge chooses them
(:mod:`dammerge.threads`). ``--baseline`` also measures every setting with libgomp's default
wait policy (idle threads spin), by setting ``GOMP_SPINCOUNT=300000``, libgomp's own default,
which dammerge then leaves alone: the behaviour before :mod:`dammerge.threads`.

Run it on a machine nobody else is using: other work on the cores is one more copy that the
result does not count (the JSON records the CPU use at start and warns when it was busy).
``--quick`` replaces the build by a second or so of small parallel torch operations behind the
same thread setup, and writes ``contention_quick.json``; its ratios say little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench scripts run as files, not as a package: import the helpers beside them
from _common import busy_warning, machine_info, run_measured, timestamp, write_json

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "contention"
TARGETS = {1: 2.5, 3: 6.0}  # copies beside the job -> the largest slowdown accepted
BUDGET_ALONE_SECONDS = 90  # bench/family_build.py's budget for the micro build
CHOSEN_BY_DAMMERGE = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPINNING = {"GOMP_SPINCOUNT": "300000"}  # libgomp's default spin count, set explicitly
QUICK_STEPS = 2000

QUICK_JOB = """
import json, sys, time
from pathlib import Path
from dammerge.threads import configure_threads
configure_threads()
import torch
torch.manual_seed(0)
x, w = torch.randn(64, 256), torch.randn(256, 256)
start = time.perf_counter()
for _ in range(int(sys.argv[2])):
    x = torch.tanh(x @ w) * 0.5
Path(sys.argv[1], "result.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
"""


@dataclass(frozen=True)
class Job:
    """What every process of a setting runs, and how long its own work took."""

    name: str
    command: Callable[[Path], list[str]]
    seconds: Callable[[Path], float]


def family_build_job(size: str) -> Job:
    def command(folder: Path) -> list[str]:
        build = ["family", "build", str(folder), "--size", size, "--force"]
        return [sys.executable, "-m", "dammerge", *build]

    def seconds(folder: Path) -> float:
        return float(json.loads((folder / "manifest.json").read_text())["build_seconds"])

    return Job(f"family build --size {size}", command, seconds)


def quick_job(steps: int = QUICK_STEPS) -> Job:
    def command(folder: Path) -> list[str]:
        return [sys.executable, "-c", QUICK_JOB, str(folder), str(steps)]

    def seconds(folder: Path) -> float:
        return float(json.loads((folder / "result.json").read_text())["seconds"])

    return Job(f"{steps} small parallel torch operations", command, seconds)


@dataclass(frozen=True)
class Setting:
    """One measurement: ``1 + copies`` jobs started together, under one wait-policy variant."""

    variant: str
    copies: int
    repeat: int

    @property
    def label(self) -> str:
        beside = "alone" if self.copies == 0 else f"beside {self.copies}"
        return f"{self.variant}, {beside}, repeat {self.repeat}"

    def folders(self, work: Path) -> list[Path]:
        name = f"{self.variant}-beside-{self.copies}-repeat-{self.repeat}"
        return [work / name / f"job-{index}" for index in range(1 + self.copies)]


@dataclass
class Outcome:
    """The measured jobs of one setting."""

    setting: Setting
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def mean(self, key: str) -> float:
        return statistics.fmean(job[key] for job in self.jobs)


# --------------------------------------------------------------------------- arguments


def parse_copies(text: str) -> list[int]:
    """``0,1,3`` -> [0, 1, 3]: the settings to measure; 0 (alone) is the reference of the rest."""
    try:
        copies = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--copies takes counts like 0,1,3, not {text!r}"
        ) from None
    if not copies or copies[0] != 0 or any(n < 0 for n in copies):
        raise argparse.ArgumentTypeError(
            "--copies must include 0 (the job alone, the reference) and no negative count"
        )
    return copies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=parse_copies, default=[0, 1, 3])
    parser.add_argument("--repeats", type=int, default=1, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--size", default="micro", help="family size to build (micro)")
    parser.add_argument("--baseline", action="store_true", help="also measure OpenMP spinning")
    parser.add_argument("--quick", action="store_true", help="a tiny job instead of the build")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per job")
    parser.add_argument("--output", type=Path, default=None)
    return parser


def plan_settings(copies: Sequence[int], repeats: int, baseline: bool) -> list[Setting]:
    """Every setting in the order it runs: per repeat, per variant, alone first."""
    variants = ["dammerge", "spinning"] if baseline else ["dammerge"]
    return [
        Setting(variant, n, repeat)
        for repeat in range(repeats)
        for variant in variants
        for n in copies
    ]


def job_environment(variant: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job: the caller's, less what dammerge chooses for itself, plus
    libgomp's default spin count for the ``spinning`` variant."""
    env = dict(base if base is not None else os.environ)
    for name in CHOSEN_BY_DAMMERGE:
        env.pop(name, None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if variant == "spinning":
        env.update(SPINNING)
    return env


# --------------------------------------------------------------------------- measuring


def run_setting(job: Job, setting: Setting, work: Path, timeout_s: float) -> Outcome:
    """Start the setting's jobs together in fresh folders; wait for all; read their times."""
    folders = setting.folders(work)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)  # empty: a family build accepts it, the quick job needs it
    env = job_environment(setting.variant)
    with ThreadPoolExecutor(max_workers=len(folders)) as pool:
        futures = [
            pool.submit(
                run_measured,
                job.command(folder),
                label=f"{setting.label}, job {index}",
                env=env,
                timeout_s=timeout_s,
            )
            for index, folder in enumerate(folders)
        ]
        results = [future.result() for future in futures]
    outcome = Outcome(setting)
    for folder, result in zip(folders, results, strict=True):
        outcome.jobs.append(
            {
                "job_seconds": job.seconds(folder),
                "wall_seconds": result.wall_s,
                "peak_rss_bytes": result.peak_rss_bytes,
            }
        )
    return outcome


def slowdowns(outcomes: Sequence[Outcome], variant: str) -> dict[int, float]:
    """Mean job time beside N copies over the mean alone, for each N measured (repeats
    pooled), in one variant."""
    times: dict[int, list[float]] = {}
    for outcome in outcomes:
        if outcome.setting.variant == variant:
            times.setdefault(outcome.setting.copies, []).extend(
                job["job_seconds"] for job in outcome.jobs
            )
    alone = statistics.fmean(times[0])
    return {n: statistics.fmean(values) / alone for n, values in sorted(times.items()) if n}


def summary(outcomes: Sequence[Outcome], variants: Sequence[str]) -> dict[str, Any]:
    """Per variant: the slowdown ratios, and (for dammerge) the targets and the budget alone."""
    result: dict[str, Any] = {}
    for variant in variants:
        ratios = slowdowns(outcomes, variant)
        alone = [
            job["job_seconds"]
            for outcome in outcomes
            if outcome.setting.variant == variant and outcome.setting.copies == 0
            for job in outcome.jobs
        ]
        entry: dict[str, Any] = {
            "alone_seconds": round(statistics.fmean(alone), 2),
            "slowdown": {str(n): round(ratio, 2) for n, ratio in ratios.items()},
        }
        if variant == "dammerge":
            entry["targets"] = {
                str(n): {"at_most": limit, "pass": ratios[n] <= limit}
                for n, limit in TARGETS.items()
                if n in ratios
            }
        result[variant] = entry
    return result


def describe(settings: Sequence[Setting], job: Job, work: Path) -> list[str]:
    """What a run would do, one line per setting (the dry run's output)."""
    lines = [f"job: {job.name}"]
    for setting in settings:
        folders = setting.folders(work)
        command = " ".join(job.command(folders[0]))
        lines.append(f"{setting.label}: {len(folders)} process(es) at once, e.g. {command}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    job = quick_job() if args.quick else family_build_job(args.size)
    name = "contention_quick.json" if args.quick else "contention.json"
    output = args.output or HERE / "results" / name
    settings = plan_settings(args.copies, args.repeats, args.baseline)
    if args.dry_run:
        for line in describe(settings, job, WORK):
            print(line)
        print(f"would write {output}")
        return 0
    info = machine_info()
    warning = busy_warning(info)
    if warning:
        print(warning)
    outcomes = []
    for setting in settings:
        outcome = run_setting(job, setting, WORK, args.timeout)
        outcomes.append(outcome)
        print(
            f"{setting.label}: job {outcome.mean('job_seconds'):.1f} s, "
            f"process {outcome.mean('wall_seconds'):.1f} s (means of {len(outcome.jobs)})"
        )
    variants = list(dict.fromkeys(s.variant for s in settings))
    results = {
        "benchmark": "contention",
        "timestamp": timestamp(),
        "machine": info,
        "busy_warning": warning,
        "job": job.name,
        "copies": args.copies,
        "repeats": args.repeats,
        "removed_from_environment": list(CHOSEN_BY_DAMMERGE),
        "budget_alone_seconds": None if args.quick else BUDGET_ALONE_SECONDS,
        "summary": summary(outcomes, variants),
        "settings": [
            {
                "variant": o.setting.variant,
                "copies": o.setting.copies,
                "repeat": o.setting.repeat,
                "jobs": o.jobs,
            }
            for o in outcomes
        ],
    }
    write_json(output, results)
    print(json.dumps(results["summary"], indent=2))
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

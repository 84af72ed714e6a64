"""Print the targets recorded in benchmark result files, one line each: PASS or FAIL.

Reads the JSON that ``bench/dam_step.py`` and ``bench/merge_speed.py`` write (their ``targets``
entries: a list of checks, or a mapping of name to check) and, for DAM steps, which kernels ran
and why compiling was given up, if it was. Exits with 1 when a target failed or a file is
missing, so a script sees it.

    python bench/targets.py bench/results/dam_step_gpu.json bench/results/dam_step_gpu_7b.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def target_lines(result: dict[str, Any]) -> list[tuple[bool, str]]:
    """``(passed, line)`` for every target of one result."""
    checks = result.get("targets") or []
    if isinstance(checks, dict):
        checks = [{"name": name, **check} for name, check in checks.items()]
    lines = []
    for check in checks:
        limit = check.get("target") or f"<= {check.get('target_at_most')}"
        value = check["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append((bool(check["pass"]), f"{check['name']}: {shown} (target {limit})"))
    return lines


def notes(result: dict[str, Any]) -> list[str]:
    """What ran, where it matters to the targets: the kernels of each DAM variant."""
    out = []
    if result.get("compile_fallback"):
        out.append(f"compiled kernels fell back to eager: {result['compile_fallback']}")
    if result.get("compile_give_ups"):
        out.append(
            f"dynamo gave up compiling {result['compile_give_ups']} function(s) past its "
            "recompile limit: compiled variants ran partly eager"
        )
    timing = result.get("timing") or {}
    ran = {v: k for row in timing.values() for v, k in row.get("kernels_ran", {}).items()}
    if ran:
        out.append("kernels ran: " + ", ".join(f"{v} {k}" for v, k in sorted(ran.items())))
    return out


def main(argv: list[str] | None = None) -> int:
    failed = False
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        if not path.is_file():
            print(f"MISSING {path} (that part did not finish)")
            failed = True
            continue
        result = json.loads(path.read_text())
        print(f"== {path.name}")
        for note in notes(result):
            print(f"   {note}")
        for passed, line in target_lines(result):
            print(f"{'PASS' if passed else 'FAIL'} {line}")
            failed = failed or not passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

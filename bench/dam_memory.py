"""Peak memory of a DAM run on a CPU against the memory plan, for ``offload: none | layers`` and
gradient checkpointing off and on.

Each configuration runs in its own subprocess (as ``bench/dam_step.py``'s memory children): the
child records its RSS after its imports and token data exist (the baseline), builds the merge
module of a Llama-shaped family (untied ``lm_head``, float32, N sources) sized so that the weight
stores dominate, runs ``--steps`` training steps through the engine's own
``Trainer.train_step`` with the ``dam`` preset (teachers on the fly), and reports the kernel's
high-water mark of its own RSS (``VmHWM``) minus that baseline. The plan is
:func:`dammerge.learned.memory_plan.plan_memory` for the same shape, settings and longest
example, on the CPU, where device and host memory are one budget (its ``peak``).

Freed CPU memory is kept for reuse during the steps, as the engine's training loop does
(:mod:`dammerge.memory`), so the high-water mark includes what glibc keeps.

Target (issue 15): every configuration's measured peak within 15 % of the plan.

    .venv/bin/python bench/dam_memory.py            # -> bench/results/dam_memory.json
    .venv/bin/python bench/dam_memory.py --quick    # toy sizes -> dam_memory_quick.json

Memory ratios hardly depend on other jobs sharing the cores; the JSON still records whether the
CPUs were busy at the start (``machine.cpu_busy_percent_at_start`` and ``busy_warning``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench scripts run as files, not as a package: import the helpers beside them
from _common import busy_warning, gib, machine_info, timestamp, write_json
from dam_step import ModelSize, _status_bytes, ensure_family, make_data

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work" / "dam_memory"
RESULTS = REPO / "bench" / "results"
TARGET = 0.15  # |measured / planned − 1|
THREADS = 2
CONFIGURATIONS = (
    {"offload": "none", "gradient_checkpointing": False},
    {"offload": "none", "gradient_checkpointing": True},
    {"offload": "layers", "gradient_checkpointing": False},
    {"offload": "layers", "gradient_checkpointing": True},
)


@dataclass(frozen=True)
class MemoryBench:
    """The measured model and run (recorded in the JSON)."""

    size: ModelSize
    n: int
    seq_len: int
    steps: int
    dtype: str = "float32"
    seed: int = 0


FULL = MemoryBench(
    size=ModelSize(hidden=1024, layers=8, intermediate=4096, heads=16, kv_heads=8, vocab=32000),
    n=3,
    seq_len=256,
    steps=2,
)
QUICK = MemoryBench(
    size=ModelSize(hidden=256, layers=4, intermediate=1024, heads=4, kv_heads=2, vocab=2000),
    n=2,
    seq_len=64,
    steps=1,
)


def settings_for(config: dict[str, Any]) -> Any:
    """The ``dam`` preset (teachers on the fly) with one configuration's memory options."""
    from dammerge.learned.presets import DAM
    from dammerge.learned.settings import parse_settings

    return parse_settings(dict(config), DAM)


def planned(bench: MemoryBench, base: Path, config: dict[str, Any]) -> Any:
    """The memory plan of one configuration on this CPU (capacity left unset: no verdict)."""
    from dammerge.checkpoint.reader import Checkpoint
    from dammerge.learned.memory_plan import ModelShape, plan_memory

    return plan_memory(
        ModelShape.from_checkpoint(Checkpoint(base)),
        settings_for(config),
        n_sources=bench.n,
        longest=bench.seq_len,
        dtype=getattr(torch, bench.dtype),
        device="cpu",
    )


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the subprocess: baseline, build, train ``steps`` steps, report the RSS growth."""
    torch.set_num_threads(THREADS)
    import transformers  # noqa: F401 - every import before the baseline

    from dammerge.checkpoint.reader import Checkpoint
    from dammerge.learned.model import MergeOptions, build_merged_model
    from dammerge.learned.teachers import OnTheFlyTeacher
    from dammerge.learned.train import Trainer
    from dammerge.memory import reuse_freed_memory

    bench = _bench_from_dict(spec["bench"])
    config = spec["config"]
    settings = settings_for(config)
    data = make_data(bench.n, bench.seq_len, bench.size.vocab, bench.seed)
    base, sources = Path(spec["base"]), [Path(s) for s in spec["sources"]]
    _import_architecture(base)
    gc.collect()
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    with reuse_freed_memory():
        model = build_merged_model(
            Checkpoint(base),
            [Checkpoint(s) for s in sources],
            MergeOptions(granularity=settings.granularity),
            dtype=getattr(torch, bench.dtype),
            keep_teacher_weights=True,
            offload=settings.offload,
        )
        built = _status_bytes("VmRSS")
        trainer = Trainer(
            model,
            data,
            OnTheFlyTeacher(model),
            settings,
            Path(spec["work"]),
            device=torch.device("cpu"),
            progress=False,
        )
        for _ in range(bench.steps):
            trainer.train_step()
        peak = _status_bytes("VmHWM")
    return {
        "baseline_rss_bytes": baseline,
        "after_build_rss_bytes": built,
        "peak_rss_bytes": peak,
        "peak_minus_baseline_bytes": peak - baseline,
        "build_and_steps_s": time.perf_counter() - start,
    }


def _import_architecture(base: Path) -> None:
    """Build the architecture's skeleton on the meta device (no memory) so that its modeling
    module is imported before the baseline: importing it costs over 100 MiB of RSS, a constant
    of the library that no plan of the model's tensors should count."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))


def measure(bench: MemoryBench, config: dict[str, Any], base: Path, sources: list[Path]) -> dict:
    """One configuration: the child's measurement beside the plan's figures."""
    spec = {
        "bench": asdict(bench),
        "config": config,
        "base": str(base),
        "sources": [str(s) for s in sources],
        "work": str(WORK / "trainer"),
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {config} failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = planned(bench, base, config)
    ratio = measured["peak_minus_baseline_bytes"] / plan.peak
    return {
        "config": config,
        "measured": measured,
        "planned_peak_bytes": plan.peak,
        "planned": {item.name: item.device + item.host for item in plan.items},
        "plan_lines": plan.lines(),
        "measured_over_planned": round(ratio, 4),
        "pass": abs(ratio - 1) <= TARGET,
    }


def _bench_from_dict(data: dict[str, Any]) -> MemoryBench:
    return MemoryBench(**{**data, "size": ModelSize(**data["size"])})


def print_report(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DAM peak memory on a CPU: measured (RSS growth) against the plan")
    for column in ("offload", "checkpointing", "measured", "planned", "ratio", "pass"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["config"]["offload"],
            str(row["config"]["gradient_checkpointing"]),
            gib(row["measured"]["peak_minus_baseline_bytes"]),
            gib(row["planned_peak_bytes"]),
            f"{row['measured_over_planned']:.3f}",
            "[green]pass" if row["pass"] else "[red]FAIL",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (checks it runs)")
    parser.add_argument("--output", type=Path, help="result JSON (default bench/results/...)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    bench = QUICK if args.quick else FULL
    output = args.output or RESULTS / ("dam_memory_quick.json" if args.quick else "dam_memory.json")
    machine = machine_info()
    warning = busy_warning(machine)
    if warning:
        print(warning, file=sys.stderr)
    began = time.perf_counter()
    base, sources = ensure_family(bench.size, bench.n, getattr(torch, bench.dtype))
    rows = [measure(bench, config, base, sources) for config in CONFIGURATIONS]
    result = {
        "benchmark": "dam_memory",
        "timestamp": timestamp(),
        "machine": machine,
        "busy_warning": warning,
        "settings": {
            **asdict(bench),
            "threads": THREADS,
            "teacher": "on_the_fly",
            "preset": "dam",
            "engine_step": "dammerge.learned.train.Trainer.train_step",
            "measured": "VmHWM minus VmRSS after imports, one subprocess per configuration",
            "planned": "dammerge.learned.memory_plan.plan_memory(...).peak, device cpu",
        },
        "target": f"|measured / planned - 1| <= {TARGET}",
        "results": rows,
        "all_pass": all(row["pass"] for row in rows),
        "wall_s": round(time.perf_counter() - began, 1),
    }
    write_json(output, result)
    print_report(rows)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

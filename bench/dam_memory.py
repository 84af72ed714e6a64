"""Peak memory of a DAM run against the memory plan, for ``offload: none | layers`` and gradient
checkpointing off and on; on a GPU also the time of a step with streamed stores against
resident ones.

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

On a CUDA GPU (``--gpu``) the run is a realistic one: three ~1B bf16 sources (TinyLlama's widths,
22 layers) at 2,048-token examples, each configuration in turn in one process (the caching
allocator counts exactly what the run holds: ``torch.cuda.max_memory_allocated`` minus what was
allocated before, no baseline to guess), one warm-up step (compiling the store passes) and
``--steps`` timed ones. The plan is the device side of the same plan (``device_peak``); the
streamed stores' pinned host memory is the plan's host side. ``bench/gpu_checks.sh`` runs it
(part ``offload``).

Target (issue 15): every configuration's measured peak within 15 % of the plan.

    .venv/bin/python bench/dam_memory.py            # -> bench/results/dam_memory.json
    .venv/bin/python bench/dam_memory.py --quick    # toy sizes -> dam_memory_quick.json
    python3 bench/dam_memory.py --gpu --work /dev/shm/x   # -> bench/results/dam_memory_gpu.json

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
import dam_step
from _common import busy_warning, gib, machine_info, timestamp, write_json
from dam_step import (
    ModelSize,
    _status_bytes,
    ensure_direct_family,
    ensure_family,
    make_data,
    store_bytes,
)

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
# On a GPU the streamed-against-resident pair without checkpointing first, so a run cut at its
# time limit still has it; each row is written as soon as it is measured.
GPU_ORDER = (0, 2, 1, 3)


@dataclass(frozen=True)
class MemoryBench:
    """The measured model and run (recorded in the JSON)."""

    size: ModelSize
    n: int
    seq_len: int
    steps: int
    dtype: str = "float32"
    device: str = "cpu"
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
# The GPU measurement: 3 x ~1B bf16 (TinyLlama-like: GQA 32/4), the paper's 2,048 tokens.
GPU = MemoryBench(
    size=ModelSize(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    n=3,
    seq_len=2048,
    steps=3,
    dtype="bfloat16",
    device="cuda",
)


def settings_for(config: dict[str, Any]) -> Any:
    """The ``dam`` preset (teachers on the fly) with one configuration's memory options."""
    from dammerge.learned.presets import DAM
    from dammerge.learned.settings import parse_settings

    return parse_settings(dict(config), DAM)


def _torch_dtype(bench: MemoryBench) -> torch.dtype:
    return getattr(torch, bench.dtype)


def planned(bench: MemoryBench, base: Path, config: dict[str, Any]) -> Any:
    """The memory plan of one configuration on this CPU (capacity left unset: no verdict)."""
    from dammerge.checkpoint.reader import Checkpoint
    from dammerge.learned.memory_plan import ModelShape, plan_memory

    return plan_memory(
        ModelShape.from_checkpoint(Checkpoint(base)),
        settings_for(config),
        n_sources=bench.n,
        longest=bench.seq_len,
        dtype=_torch_dtype(bench),
        device=bench.device,
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
            dtype=_torch_dtype(bench),
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
    """One configuration on the CPU: the child's measurement beside the plan's figures."""
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
    return compared(bench, config, base, measured, measured["peak_minus_baseline_bytes"])


def compared(
    bench: MemoryBench, config: dict[str, Any], base: Path, measured: dict, peak: int
) -> dict:
    """A row: what was measured beside the plan (its whole peak on a CPU, where device and
    host are one budget; its device side on a GPU)."""
    plan = planned(bench, base, config)
    expected = plan.peak if plan.unified else plan.device_peak
    ratio = peak / expected
    return {
        "config": config,
        "measured": measured,
        "planned_peak_bytes": expected,
        "planned_host_bytes": 0 if plan.unified else plan.host_peak,
        "planned": {item.name: item.device + item.host for item in plan.items},
        "plan_lines": plan.lines(),
        "measured_over_planned": round(ratio, 4),
        "pass": abs(ratio - 1) <= TARGET,
    }


def measure_on_gpu(
    bench: MemoryBench, config: dict[str, Any], base: Path, sources: list[Path], data: list[Any]
) -> dict:
    """One configuration on the GPU, in this process: build, one warm-up step, ``bench.steps``
    timed ones; the device bytes counted by the caching allocator from an empty start."""
    from dammerge.checkpoint.reader import Checkpoint
    from dammerge.devices import resolve_device
    from dammerge.learned.model import MergeOptions, build_merged_model
    from dammerge.learned.teachers import OnTheFlyTeacher
    from dammerge.learned.train import Trainer

    device = resolve_device(bench.device)  # as `dammerge dam` resolves it (pinning settings)
    settings = settings_for(config)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    model = build_merged_model(
        Checkpoint(base),
        [Checkpoint(s) for s in sources],
        MergeOptions(granularity=settings.granularity),
        device=device,
        dtype=_torch_dtype(bench),
        keep_teacher_weights=True,
        offload=settings.offload,
    )
    torch.cuda.synchronize(device)
    built = time.perf_counter()
    trainer = Trainer(
        model,
        data,
        OnTheFlyTeacher(model),
        settings,
        WORK / "trainer",
        device=device,
        progress=False,
    )
    trainer.train_step()  # warm-up: compiles the store passes for these shapes
    torch.cuda.synchronize(device)
    warm = time.perf_counter()
    times = []
    for _ in range(bench.steps):
        began = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    host = store_bytes(model, streamed_only=True)
    del trainer, model
    measured = {
        "baseline_allocated_bytes": baseline,
        "peak_allocated_bytes": peak,
        "pinned_host_bytes": host,
        "build_s": round(built - start, 2),
        "warmup_step_s": round(warm - built, 2),
        "step_s": [round(t, 4) for t in times],
        "mean_step_s": round(sum(times) / len(times), 4),
    }
    return compared(bench, config, base, measured, peak)


def gpu_comparisons(rows: list[dict]) -> list[dict]:
    """Streamed against resident stores at the same checkpointing: step time and device peak."""
    out = []
    by_config = {(r["config"]["offload"], r["config"]["gradient_checkpointing"]): r for r in rows}
    for checkpointing in (False, True):
        resident = by_config.get(("none", checkpointing))
        streamed = by_config.get(("layers", checkpointing))
        if resident is None or streamed is None:
            continue
        r, s = resident["measured"], streamed["measured"]
        out.append(
            {
                "gradient_checkpointing": checkpointing,
                "step_time_layers_over_none": round(s["mean_step_s"] / r["mean_step_s"], 3),
                "peak_device_layers_over_none": round(
                    s["peak_allocated_bytes"] / r["peak_allocated_bytes"], 3
                ),
            }
        )
    return out


def targets(rows: list[dict]) -> list[dict]:
    """One check per configuration (read by ``bench/targets.py``)."""
    return [
        {
            "name": f"measured/planned peak, offload {row['config']['offload']}, checkpointing "
            f"{'on' if row['config']['gradient_checkpointing'] else 'off'}",
            "value": row["measured_over_planned"],
            "target": f"1 +- {TARGET}",
            "pass": row["pass"],
        }
        for row in rows
    ]


def _bench_from_dict(data: dict[str, Any]) -> MemoryBench:
    return MemoryBench(**{**data, "size": ModelSize(**data["size"])})


def print_report(rows: list[dict], bench: MemoryBench) -> None:
    from rich.console import Console
    from rich.table import Table

    gpu = bench.device != "cpu"
    what = "device allocated" if gpu else "RSS growth"
    table = Table(title=f"DAM peak memory on {bench.device}: measured ({what}) against the plan")
    columns = ["offload", "checkpointing", "measured", "planned", "ratio", "pass"]
    for column in columns + (["step"] if gpu else []):
        table.add_column(column)
    for row in rows:
        measured = row["measured"]
        peak = measured["peak_allocated_bytes" if gpu else "peak_minus_baseline_bytes"]
        cells = [
            row["config"]["offload"],
            str(row["config"]["gradient_checkpointing"]),
            gib(peak),
            gib(row["planned_peak_bytes"]),
            f"{row['measured_over_planned']:.3f}",
            "[green]pass" if row["pass"] else "[red]FAIL",
        ]
        table.add_row(*cells, *([f"{measured['mean_step_s']:.3f} s"] if gpu else []))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="toy sizes (checks it runs)")
    size.add_argument("--gpu", action="store_true", help="3 x ~1B bf16 on a CUDA GPU")
    parser.add_argument("--output", type=Path, help="result JSON (default bench/results/...)")
    parser.add_argument("--work", type=Path, help="where the random checkpoints are kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA GPU, and none is visible", file=sys.stderr)
        return 2
    if args.work:
        dam_step.WORK = args.work.resolve()
    bench = GPU if args.gpu else QUICK if args.quick else FULL
    name = "dam_memory_gpu" if args.gpu else "dam_memory_quick" if args.quick else "dam_memory"
    output = args.output or RESULTS / f"{name}.json"
    machine = machine_info()
    warning = busy_warning(machine)
    if warning and not args.gpu:
        print(warning, file=sys.stderr)
    began = time.perf_counter()
    rows: list[dict] = []

    def record(how: dict[str, Any], complete: bool) -> dict[str, Any]:
        result = {
            "benchmark": "dam_memory",
            "timestamp": timestamp(),
            "machine": machine,
            "busy_warning": warning,
            "settings": {
                **asdict(bench),
                "teacher": "on_the_fly",
                "preset": "dam",
                "engine_step": "dammerge.learned.train.Trainer.train_step",
                **how,
            },
            "target": f"|measured / planned - 1| <= {TARGET}",
            "results": rows,
            "targets": targets(rows),
            **({"streamed_vs_resident": gpu_comparisons(rows)} if args.gpu else {}),
            "all_pass": all(row["pass"] for row in rows),
            "complete": complete,
            "wall_s": round(time.perf_counter() - began, 1),
        }
        write_json(output, result)
        return result

    if args.gpu:
        how = {
            "measured": "torch.cuda.max_memory_allocated minus memory_allocated before the "
            "build, each configuration in turn in one process; mean of the timed steps after "
            "one warm-up step",
            "planned": "dammerge.learned.memory_plan.plan_memory(...).device_peak, device cuda",
        }
        base, sources = ensure_direct_family(
            bench.size, bench.n, _torch_dtype(bench), torch.device(bench.device)
        )
        data = make_data(bench.n, bench.seq_len, bench.size.vocab, bench.seed)
        for index in GPU_ORDER:
            rows.append(measure_on_gpu(bench, CONFIGURATIONS[index], base, sources, data))
            print(f"measured {CONFIGURATIONS[index]}", flush=True)
            record(how, complete=False)
    else:
        how = {
            "threads": THREADS,
            "measured": "VmHWM minus VmRSS after imports, one subprocess per configuration",
            "planned": "dammerge.learned.memory_plan.plan_memory(...).peak, device cpu",
        }
        base, sources = ensure_family(bench.size, bench.n, _torch_dtype(bench))
        rows.extend(measure(bench, config, base, sources) for config in CONFIGURATIONS)
    result = record(how, complete=True)
    write_json(output, result)
    print_report(rows, bench)
    for comparison in result.get("streamed_vs_resident", []):
        print(
            f"offload layers / none (checkpointing {comparison['gradient_checkpointing']}): "
            f"step time {comparison['step_time_layers_over_none']:.3f}x, device peak "
            f"{comparison['peak_device_layers_over_none']:.3f}x"
        )
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

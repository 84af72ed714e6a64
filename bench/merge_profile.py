"""Where a data-free merge's time goes: torch.profiler over one streaming TIES merge.

The inputs and recipe are ``bench/merge_speed.py``'s (generated there if missing: three bf16
fine-tunes of a Llama-shaped base, float32 compute, bfloat16 output). Torch's threads and
OpenMP's wait policy are chosen as ``dammerge merge`` chooses them. The recipe is planned
before the profiler starts (and, on a GPU, the CUDA context is created), so the profile holds
the streaming merge alone: ``dammerge.executor.execute`` from the first read to the rename.

The report gives the wall time of that merge against one warm read of its inputs, the time
the main thread spent in each stage of the loop (the ``dammerge::`` ranges: waiting for
inputs, merging, copying the result to the host, queueing it for the writer thread, waiting
for the last writes), the time the writer thread spent writing (the profiler sees only the
main thread), the operators sorted by self time (CPU, and on a GPU the device too), and on a
GPU the page-locked (pinned) host allocator's counters: how many blocks it had to allocate
from CUDA and the time that took.

    python bench/merge_profile.py --small                 # CPU, ~40 MB models
    python bench/merge_profile.py --device cuda           # full size (4 x ~1.2 GB), on a GPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dammerge.threads import configure_threads

configure_threads()  # the threads `dammerge merge` runs with; before torch loads
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import merge_speed  # noqa: E402
from _common import gib, read_files, timestamp  # noqa: E402
from dammerge.checkpoint import writer as writer_module  # noqa: E402
from dammerge.config import load_config  # noqa: E402
from dammerge.devices import resolve_device  # noqa: E402
from dammerge.executor import execute  # noqa: E402
from dammerge.plan import build_plan  # noqa: E402

STAGE_PREFIX = "dammerge::"
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
HOST_ALLOCATOR_KEYS = (
    "num_host_alloc",
    "host_alloc_time.total",
    "host_alloc_time.max",
    "allocated_bytes.peak",
    "active_bytes.peak",
    "num_host_free",
)


def wait_policy() -> str:
    """How idle OpenMP threads wait in this process (``dammerge.threads`` chose it)."""
    chosen = [f"{key}={os.environ[key]}" for key in WAIT_SETTINGS if key in os.environ]
    return ", ".join(chosen) or "libgomp's default wait"


def stage_lines(prof: profile) -> list[str]:
    """Main-thread seconds per stage of the executor's loop (its ``record_function`` ranges)."""
    lines = []
    for event in prof.key_averages():
        if event.key.startswith(STAGE_PREFIX):
            seconds = event.cpu_time_total / 1e6
            lines.append(f"  {event.key:32s} {seconds:8.3f} s over {event.count} calls")
    return sorted(lines)


@contextmanager
def timed_writes() -> Iterator[dict[str, float]]:
    """Seconds and bytes of every write of the writer thread while the block runs."""
    spent = {"seconds": 0.0, "bytes": 0.0}
    original = writer_module.write_at

    def timed(fd: int, data: memoryview, offset: int) -> None:
        start = time.perf_counter()
        original(fd, data, offset)
        spent["seconds"] += time.perf_counter() - start
        spent["bytes"] += len(data)

    writer_module.write_at = timed
    try:
        yield spent
    finally:
        writer_module.write_at = original


def host_allocator_lines() -> list[str]:
    """The pinned host allocator's counters (times in microseconds), where torch has them."""
    stats_of = getattr(torch.cuda, "host_memory_stats", None)
    if stats_of is None:
        return ["  (this torch has no torch.cuda.host_memory_stats)"]
    stats = stats_of()
    return [f"  {key:24s} {stats.get(key)}" for key in HOST_ALLOCATOR_KEYS]


def profile_merge(size: str, device_name: str, rows: int) -> list[str]:
    """Profile one merge of ``size`` on ``device_name``; the report's lines."""
    base, variants = merge_speed.ensure_inputs(size)
    root = merge_speed.WORK / f"merge_speed-{size}"
    recipe = root / "recipe.yml"
    merge_speed.write_recipe(recipe, base, variants)
    files = merge_speed.input_files([base, *variants])
    read_files(files)  # warm the page cache, as merge_speed does
    input_bytes, io_seconds = read_files(files)

    device = resolve_device(device_name)
    plan = build_plan(load_config(recipe))
    gpu = device.type == "cuda"
    if gpu:
        torch.zeros(1, device=device)  # the CUDA context, outside the profile
        torch.cuda.synchronize()
    out = root / "profile-out"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with timed_writes() as writes, profile(activities=activities) as prof:
        start = time.perf_counter()
        execute(plan, out, device=device, overwrite=True, progress=False)
        wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)

    averages = prof.key_averages()
    lines = [
        f"Data-free merge profile: TIES, {size} ({gib(input_bytes)} of inputs), {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads ({wait_policy()}), "
        f"{timestamp()}",
        f"streaming merge {wall:.3f} s; one warm read of the inputs {io_seconds:.3f} s "
        f"(ratio {wall / io_seconds:.2f}; profiler overhead included)",
        "",
        "main thread, per stage of the loop:",
        *stage_lines(prof),
        f"writer thread: {writes['seconds']:.3f} s writing {gib(writes['bytes'])} "
        f"({int(writes['bytes'])} bytes)",
    ]
    if gpu:
        lines += ["", "pinned host allocator:", *host_allocator_lines()]
    sorts = ["self_cpu_time_total"] + (["self_device_time_total"] if gpu else [])
    for sort_by in sorts:
        table = averages.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
        lines += ["", f"== operators by {sort_by}", table]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="~40 MB models (a quick check)")
    parser.add_argument("--device", default="cpu", help="the merge's device (cpu or cuda)")
    parser.add_argument("--rows", type=int, default=30, help="operators listed per table")
    parser.add_argument("--output", type=Path, help="default bench/results/merge_profile_*.txt")
    args = parser.parse_args(argv)
    size = "small" if args.small else "full"
    suffix = args.device.split(":")[0] + ("_small" if args.small else "")
    output = args.output or merge_speed.RESULTS / f"merge_profile_{suffix}.txt"
    lines = profile_merge(size, args.device, args.rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

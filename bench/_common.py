"""Shared helpers for the benchmarks: run a command while measuring its wall time and peak
memory, describe the machine, read files to time the I/O bound, write results as JSON.

Benchmarks compare whole commands (ours against a peer tool) as subprocesses, so that each
tool's imports, threads and allocator are counted and neither shares a Python heap with the
harness. Peak memory is measured two ways and the larger is reported:

- ``os.wait4`` gives the kernel's ``ru_maxrss`` of the child (the largest RSS reached by the
  child, or by any one of its waited-for descendants);
- polling with psutil every ``poll_s`` seconds sums the RSS of the child and all its
  descendants, which catches worker processes alive at the same time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

READ_CHUNK = 64 * 2**20


@dataclass
class RunResult:
    """One measured run of a command."""

    label: str
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    polled_peak_rss_bytes: int
    wait4_maxrss_bytes: int
    output_tail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CommandFailed(RuntimeError):
    """A measured command exited with a non-zero status."""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_measured(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    label: str = "",
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    poll_s: float = 0.05,
    timeout_s: float | None = None,
    check: bool = True,
) -> RunResult:
    """Run ``cmd`` to completion and return its wall time and peak RSS (see module docstring).

    stdout and stderr go to a temporary file (not a pipe, so a chatty progress bar can never
    block the child); the last 4,000 characters come back in ``output_tail``.
    """
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}-{time.time_ns()}.log"
    with open(log_path, "w+b") as log:
        start = time.perf_counter()
        child = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        watched = psutil.Process(child.pid)
        polled_peak = 0
        status, usage = 0, None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            polled_peak = max(polled_peak, _tree_rss(watched))
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                child.kill()
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-4000:]
    log_path.unlink(missing_ok=True)
    maxrss = int(usage.ru_maxrss) * 1024 if usage is not None else 0  # KiB on Linux
    result = RunResult(
        label=label or Path(str(cmd[0])).name,
        wall_s=wall,
        peak_rss_bytes=max(polled_peak, maxrss),
        returncode=child.returncode,
        polled_peak_rss_bytes=polled_peak,
        wait4_maxrss_bytes=maxrss,
        output_tail=tail,
    )
    if check and child.returncode != 0:
        raise CommandFailed(f"{result.label} exited with {child.returncode}:\n{tail}")
    return result


def read_files(paths: Iterable[Path], chunk: int = READ_CHUNK) -> tuple[int, float]:
    """Read every byte of ``paths`` once (sequentially, large chunks); (bytes, seconds).

    Used as the I/O bound of a merge: no merge can finish before its inputs are read once.
    """
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while True:
                n = handle.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - start


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (the bench machine is often shared and noisy)."""
    memory = psutil.virtual_memory()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "cpu_model": _cpu_model(),
        "ram_total_bytes": memory.total,
        "ram_available_bytes_at_start": memory.available,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_busy_percent_at_start": psutil.cpu_percent(interval=1.0),
        # libgomp reads it once, when torch loads: spin-then-sleep by default, or ACTIVE/PASSIVE
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        # the kernels' vector width: results that round differently on another host say why
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


BUSY_PERCENT = 20.0  # CPU use by others, over one second at start, that makes timings unreliable


def busy_warning(info: Mapping[str, Any]) -> str | None:
    """A warning when other work was using the cores as the benchmark started (else None).

    Timings taken beside other jobs are unreliable, and with OpenMP's default wait policy
    spinning workers can slow a step many times over on oversubscribed cores. The load average
    would say so too late and too long (it still shows a job that ended a minute ago), so
    :func:`machine_info` samples the CPU use over one second instead.
    """
    busy = info.get("cpu_busy_percent_at_start")
    if busy is None or busy <= BUSY_PERCENT:
        return None
    return (
        f"warning: the CPUs were {busy:.0f}% busy at start: other jobs are using the cores, so "
        "these timings are unreliable; run the benchmark alone (or with OMP_WAIT_POLICY=PASSIVE "
        "if the cores must be shared)"
    )


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return platform.processor() or None


def median_of(runs: Sequence[RunResult], field: str) -> float:
    return float(statistics.median(getattr(r, field) for r in runs))


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically (a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"

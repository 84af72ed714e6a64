"""CPU threads on a shared machine: how many torch threads a command uses, and how idle ones wait.

torch starts one intra-op thread per CPU that OpenMP sees (the affinity mask), which ignores a
container's CPU quota (cgroup ``cpu.max``), and OpenMP's default wait policy (libgomp's, in
torch's wheels) keeps an idle thread spinning for milliseconds between parallel operations. On
cores that other jobs also use, spinning threads burn the time that the other jobs' threads are
waiting for, and every job slows down many times over.

:func:`configure_threads` runs at the entry of each heavy command (merge, family build, evaluate,
experiment, demo), before torch is imported, and sets environment variables that torch, OpenMP
and the processes a command starts read when they load:

- ``OMP_NUM_THREADS``: the CPUs this process may use, the affinity mask capped by the cgroup
  quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), unless the user set it;
- how idle threads wait, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``: when
  other work already keeps the CPUs busy as the command starts (sampled from ``/proc/stat``),
  ``OMP_WAIT_POLICY=PASSIVE``, so they sleep at once; otherwise ``GOMP_SPINCOUNT`` at tens of
  microseconds (:data:`BOUNDED_SPINS`, against libgomp's ~3 ms), long enough to catch
  the next operation of a running step, short enough that a job that started on idle cores
  wastes little once other jobs arrive (they cannot be seen at start when they start at the
  same moment). Passive threads are woken through the kernel for every parallel operation, a
  cost an idle machine need not pay, hence only when busy.

The thread count never follows the load: the bits of a trained result depend on the thread
count, and a run should give the same result whatever else the machine is doing; the wait
policy changes only when idle threads sleep, never what is computed. A process that imported
torch already (a Python program calling dammerge) keeps its own settings.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.2  # how long the load is sampled at start
# Our threads count as crowded when the CPUs that others leave idle hold fewer than all of
# them, with this margin (in CPUs) for the noise of a short sample.
CROWDING_MARGIN = 0.5
# libgomp's GOMP_SPINCOUNT on idle CPUs: a three-hundredth of its default of 300,000 spins
# (which it estimates at 3 ms; the pause instruction's cost varies by CPU, so tens of
# microseconds). Long enough to catch the next operation of a running step; short enough that
# jobs which started together on the same cores (none saw the other at start) do not spin away
# each other's time slices at every parallel operation (bench/contention.py).
BOUNDED_SPINS = 1_000


@dataclass(frozen=True)
class ThreadPlan:
    """What :func:`configure_threads` chose, and why.

    ``threads``: torch's intra-op threads; ``source``: ``OMP_NUM_THREADS`` when the user chose
    them, else ``cpus``; ``busy``: CPUs' worth of other work on our CPUs at start (None when
    not measured); ``wait``: the environment that sets how idle threads wait (empty when the
    user set it, or with one thread); ``applied``: False when torch was loaded already and
    nothing could be changed.
    """

    threads: int
    source: str
    busy: float | None = None
    wait: dict[str, str] = field(default_factory=dict)
    applied: bool = True

    @property
    def passive(self) -> bool:
        return self.wait.get("OMP_WAIT_POLICY") == "PASSIVE"

    def note(self, cpus: int) -> str | None:
        """One line for the user when the CPUs were found busy (else None)."""
        if not self.passive or self.busy is None:
            return None
        return (
            f"note: other work keeps the CPUs busy ({self.busy:.1f} of {cpus} in use at start): "
            "idle torch threads will sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE)"
        )


# --------------------------------------------------------------------------- CPUs we may use


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """The folders of a cgroup and of each of its parents up to the mount ``root``.

    Every ancestor's limit applies to the group. Inside a container the path may name a
    folder that is not mounted there; its parents (and ``root``) still are.
    """
    parts = [part for part in cgroup_path.split("/") if part and part != ".."]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(folder: Path) -> float | None:
    """``cpu.max`` ("QUOTA PERIOD", or "max PERIOD" for none) as CPUs."""
    text = _read(folder / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max" or len(fields) != 2:
        return None
    quota, period = int(fields[0]), int(fields[1])
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` as CPUs (a quota of -1: none)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if not quota or not period:
        return None
    quota_us, period_us = int(quota), int(period)
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cgroup_cpu_limit(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """The CPU time the cgroup quotas allow this process, in CPUs (None: no quota).

    Reads ``/proc/self/cgroup``: the v2 line (``0::PATH``) points at ``cpu.max`` files under
    ``root``, a v1 line naming the ``cpu`` controller at ``cpu.cfs_quota_us`` files under
    ``root/<controllers>``. The smallest limit of the group and its ancestors wins.
    """
    text = _read(proc_cgroup)
    if not text:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            found = [_v2_limit(folder) for folder in _ancestors(root, path)]
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu"]
            found = [
                _v1_limit(folder)
                for mount in mounts
                if mount.is_dir()
                for folder in _ancestors(mount, path)
            ]
        else:
            continue
        limits += [limit for limit in found if limit is not None]
    return min(limits, default=None)


def usable_cpus(
    affinity: set[int] | None = None,
    proc_cgroup: Path = PROC_CGROUP,
    cgroup_root: Path = CGROUP_ROOT,
) -> int:
    """How many CPUs this process can keep busy: the affinity mask, capped by the cgroup quota
    (rounded up: a quota of 1.5 CPUs runs 2 threads, each for part of the time)."""
    count = len(affinity if affinity is not None else affinity_cpus())
    limit = cgroup_cpu_limit(proc_cgroup, cgroup_root)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)


# --------------------------------------------------------------------------- load at start


def cpu_times(stat_text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU ``(busy, total)`` clock ticks from ``/proc/stat`` text.

    The fields after ``cpuN`` are user, nice, system, idle, iowait, irq, softirq, steal (then
    guest time, already counted in user); idle and iowait are the idle ones.
    """
    times = {}
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        ticks = [int(value) for value in fields[:8]]
        total = sum(ticks)
        idle = sum(ticks[3:5])
        times[int(name[3:])] = (total - idle, total)
    return times


def busy_between(
    before: Mapping[int, tuple[int, int]], after: Mapping[int, tuple[int, int]], cpus: set[int]
) -> float:
    """CPUs' worth of work done on ``cpus`` between two :func:`cpu_times` samples."""
    busy = 0.0
    for cpu in cpus:
        if cpu not in before or cpu not in after:
            continue
        busy_ticks = after[cpu][0] - before[cpu][0]
        total_ticks = after[cpu][1] - before[cpu][1]
        if total_ticks > 0:
            busy += min(1.0, max(0.0, busy_ticks / total_ticks))
    return busy


def sample_busy_cpus(
    cpus: set[int], seconds: float = SAMPLE_SECONDS, stat: Path = PROC_STAT
) -> float | None:
    """CPUs' worth of work that other processes do on ``cpus``, sampled over ``seconds`` while
    this process sleeps (None where ``/proc/stat`` cannot be read)."""
    first = _read(stat)
    if first is None:
        return None
    time.sleep(seconds)
    second = _read(stat)
    if second is None:
        return None
    return busy_between(cpu_times(first), cpu_times(second), cpus)


# --------------------------------------------------------------------------- the choice


def _print_note(line: str) -> None:
    from dammerge.terminal import print_lines

    print_lines([line], style="yellow")


def _user_threads(environ: Mapping[str, str]) -> int | None:
    """OMP_NUM_THREADS as the user set it (its first level, e.g. "4,2" -> 4), if valid."""
    text = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def plan_threads(
    environ: Mapping[str, str], cpus: int, usable: int, measure_busy: Callable[[], float | None]
) -> ThreadPlan:
    """The choice, from the environment and the machine (``measure_busy`` is called only when
    the wait policy is ours to set and there is more than one thread to wait).

    ``cpus``: the CPUs of the affinity mask, where the load is measured; ``usable``: what this
    process may keep busy (see :func:`usable_cpus`). The CPUs count as busy when those that
    other work leaves idle cannot hold all our threads.
    """
    user_threads = _user_threads(environ)
    threads = user_threads or usable
    source = "OMP_NUM_THREADS" if user_threads else "cpus"
    user_policy = "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ
    if threads <= 1 or user_policy:
        return ThreadPlan(threads, source)
    busy = measure_busy()
    crowded = busy is not None and threads > cpus - busy + CROWDING_MARGIN
    wait = {"OMP_WAIT_POLICY": "PASSIVE"} if crowded else {"GOMP_SPINCOUNT": str(BOUNDED_SPINS)}
    return ThreadPlan(threads, source, busy=busy, wait=wait)


def configure_threads(
    environ: MutableMapping[str, str] | None = None,
    *,
    proc_cgroup: Path = PROC_CGROUP,
    cgroup_root: Path = CGROUP_ROOT,
    stat: Path = PROC_STAT,
    report: Callable[[str], None] | None = None,
) -> ThreadPlan:
    """Choose torch's threads and OpenMP's wait policy for this command (see the module).

    Writes ``OMP_NUM_THREADS`` and the wait policy (``OMP_WAIT_POLICY=PASSIVE`` when the CPUs
    are busy, else a bounded ``GOMP_SPINCOUNT``) into ``environ`` (``os.environ``) for torch
    and the processes the command starts; ``report``
    (the console's stderr by default) gets one line when the CPUs were found busy. Does
    nothing once torch is loaded.
    """
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules:
        threads = _user_threads(environ) or 0
        return ThreadPlan(threads, "torch", applied=False)
    affinity = affinity_cpus()
    usable = usable_cpus(affinity, proc_cgroup, cgroup_root)
    plan = plan_threads(
        environ, len(affinity), usable, lambda: sample_busy_cpus(affinity, stat=stat)
    )
    environ.setdefault("OMP_NUM_THREADS", str(plan.threads))
    environ.update(plan.wait)
    note = plan.note(len(affinity))
    if note is not None:
        (report or _print_note)(note)
    return plan

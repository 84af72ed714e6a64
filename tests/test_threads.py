"""Thread counts from the CPUs a process may use, and how idle threads wait on busy cores.

The cgroup and /proc files are fakes written here, each limit worked out by hand from the
kernel's definitions (quota / period, in CPUs; "max" or -1 for none).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dammerge.threads import (
    BOUNDED_SPINS,
    ThreadPlan,
    busy_between,
    cgroup_cpu_limit,
    configure_threads,
    cpu_times,
    plan_threads,
    usable_cpus,
)

SOURCE = Path(__file__).resolve().parents[1] / "src"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- cgroup quotas


def test_v2_quota_is_the_smallest_over_the_group_and_its_ancestors(tmp_path):
    root = tmp_path / "cgroup"
    proc = write(tmp_path / "proc_cgroup", "0::/user.slice/job\n")
    write(root / "user.slice" / "job" / "cpu.max", "150000 100000\n")  # 1.5 CPUs
    write(root / "user.slice" / "cpu.max", "max 100000\n")  # no limit
    write(root / "cpu.max", "400000 100000\n")  # 4 CPUs
    assert cgroup_cpu_limit(proc, root) == pytest.approx(1.5)
    assert usable_cpus(set(range(8)), proc, root) == 2  # 1.5 CPUs run 2 threads
    assert usable_cpus({0}, proc, root) == 1  # the affinity mask is smaller still
    write(root / "cpu.max", "50000 100000\n")  # a parent allowing half a CPU wins
    assert cgroup_cpu_limit(proc, root) == pytest.approx(0.5)
    assert usable_cpus(set(range(8)), proc, root) == 1


def test_v2_without_a_quota_leaves_the_affinity_mask(tmp_path):
    root = tmp_path / "cgroup"
    proc = write(tmp_path / "proc_cgroup", "0::/\n")
    write(root / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(proc, root) is None
    assert usable_cpus({0, 1, 2}, proc, root) == 3


def test_a_container_sees_its_own_group_at_the_mount_root(tmp_path):
    """Without a cgroup namespace the path names the host's folder, which is not mounted."""
    root = tmp_path / "cgroup"
    proc = write(tmp_path / "proc_cgroup", "0::/docker/0123abcd\n")
    write(root / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(proc, root) == pytest.approx(2.0)


def test_v1_cpu_controller_quota(tmp_path):
    root = tmp_path / "cgroup"
    proc = write(
        tmp_path / "proc_cgroup",
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
    )
    group = root / "cpu,cpuacct" / "docker" / "abc"
    write(group / "cpu.cfs_quota_us", "300000\n")
    write(group / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(proc, root) == pytest.approx(3.0)
    write(group / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert cgroup_cpu_limit(proc, root) is None


def test_no_cgroup_files_mean_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path) is None
    proc = write(tmp_path / "proc_cgroup", "0::/a/b\n")
    assert cgroup_cpu_limit(proc, tmp_path / "not-mounted") is None


# --------------------------------------------------------------------------- load at start

STAT_BEFORE = """cpu  300 0 100 1000 0 0 0 0 0 0
cpu0 100 0 50 500 0 0 0 0 0 0
cpu1 200 0 50 500 0 0 0 0 0 0
intr 12345
"""
# cpu0: 30 busy ticks of 60 (user 20, system 10, idle 20, iowait 10); cpu1: 50 busy of 50
STAT_AFTER = """cpu  370 0 110 1020 10 0 0 0 0 0
cpu0 120 0 60 520 10 0 0 0 0 0
cpu1 250 0 50 500 0 0 0 0 0 0
intr 12400
"""


def test_busy_cpus_from_two_proc_stat_samples():
    before, after = cpu_times(STAT_BEFORE), cpu_times(STAT_AFTER)
    assert set(before) == {0, 1}  # the aggregate "cpu" line is not a CPU
    assert before[0] == (150, 650)
    assert busy_between(before, after, {0, 1}) == pytest.approx(30 / 60 + 50 / 50)
    assert busy_between(before, after, {0}) == pytest.approx(0.5)
    assert busy_between(before, after, {7}) == 0.0  # a CPU the samples do not know


# --------------------------------------------------------------------------- the choice


def never_measured() -> float:
    raise AssertionError("the load was measured although the choice did not need it")


@pytest.mark.parametrize(
    ("environ", "cpus", "usable", "busy", "threads", "wait"),
    [
        ({}, 2, 2, 0.1, 2, {"GOMP_SPINCOUNT": str(BOUNDED_SPINS)}),  # idle: bounded spinning
        ({}, 2, 2, 1.0, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),  # one CPU taken: sleep
        ({}, 64, 2, 10.0, 2, {"GOMP_SPINCOUNT": str(BOUNDED_SPINS)}),  # quota 2, 54 CPUs idle
        ({}, 64, 2, 62.0, 2, {"GOMP_SPINCOUNT": str(BOUNDED_SPINS)}),  # 2 idle CPUs: enough
        ({}, 64, 2, 63.0, 2, {"OMP_WAIT_POLICY": "PASSIVE"}),  # 1 idle CPU for 2 threads
        ({}, 4, 4, None, 4, {"GOMP_SPINCOUNT": str(BOUNDED_SPINS)}),  # load unknown
        ({"OMP_NUM_THREADS": "3"}, 8, 8, 7.5, 3, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({"OMP_NUM_THREADS": "4,2"}, 8, 8, 0.0, 4, {"GOMP_SPINCOUNT": str(BOUNDED_SPINS)}),
        ({"OMP_NUM_THREADS": "zero"}, 2, 2, 0.0, 2, {"GOMP_SPINCOUNT": str(BOUNDED_SPINS)}),
    ],
)
def test_threads_follow_the_cpus_and_the_wait_follows_the_load(
    environ, cpus, usable, busy, threads, wait
):
    plan = plan_threads(environ, cpus, usable, lambda: busy)
    assert plan.threads == threads
    assert plan.wait == wait
    assert plan.busy == busy


@pytest.mark.parametrize(
    ("environ", "threads", "source"),
    [
        ({"OMP_NUM_THREADS": "1"}, 1, "OMP_NUM_THREADS"),  # no worker thread waits at all
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, "cpus"),  # the user chose how to wait
        ({"GOMP_SPINCOUNT": "300000"}, 2, "cpus"),
        ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}, 2, "OMP_NUM_THREADS"),
    ],
)
def test_a_users_settings_are_kept_and_the_load_is_not_measured(environ, threads, source):
    plan = plan_threads(environ, 2, 2, never_measured)
    assert (plan.threads, plan.source, plan.wait, plan.busy) == (threads, source, {}, None)


def test_one_note_only_when_the_threads_were_told_to_sleep():
    assert ThreadPlan(2, "cpus", busy=0.2, wait={"GOMP_SPINCOUNT": "1"}).note(2) is None
    note = ThreadPlan(2, "cpus", busy=1.7, wait={"OMP_WAIT_POLICY": "PASSIVE"}).note(2)
    assert note is not None and "\n" not in note
    assert "1.7 of 2" in note and "OMP_WAIT_POLICY=PASSIVE" in note


def test_a_process_that_loaded_torch_keeps_its_settings():
    import torch  # noqa: F401  (loaded already by the test session: made explicit here)

    environ: dict[str, str] = {}
    plan = configure_threads(environ)
    assert not plan.applied and environ == {}


# --------------------------------------------------------------------------- end to end

CHILD = """
import json, os, sys
from pathlib import Path
from dammerge.threads import configure_threads
notes = []
plan = configure_threads(
    proc_cgroup=Path(sys.argv[1]), cgroup_root=Path(sys.argv[2]), stat=Path(sys.argv[3]),
    report=notes.append,
)
import torch
print(json.dumps({
    "torch_threads": torch.get_num_threads(),
    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
    "notes": notes,
}))
"""


def run_child(tmp_path: Path, quota: str, stat: str, **env: str) -> dict:
    import json

    proc = write(tmp_path / "proc_cgroup", "0::/\n")
    root = tmp_path / "cgroup"
    write(root / "cpu.max", quota)
    stat_file = write(tmp_path / "stat", stat)
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    environ.update(env, PYTHONPATH=str(SOURCE))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(proc), str(root), str(stat_file)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to cap them to 1")
def test_torch_starts_with_the_quota_not_the_cpu_count(tmp_path):
    """A quota of one CPU on a machine with more: torch's own default would be all of them."""
    idle = STAT_BEFORE  # the same sample twice: nothing ran in between
    result = run_child(tmp_path, "100000 100000\n", idle)
    assert result["torch_threads"] == 1
    assert result["env"]["OMP_NUM_THREADS"] == "1"
    assert result["env"]["OMP_WAIT_POLICY"] is None and result["env"]["GOMP_SPINCOUNT"] is None
    assert result["notes"] == []


def test_torch_keeps_the_users_thread_count(tmp_path):
    result = run_child(tmp_path, "100000 100000\n", STAT_BEFORE, OMP_NUM_THREADS="2")
    assert result["torch_threads"] == 2 and result["env"]["OMP_NUM_THREADS"] == "2"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for 2 threads")
def test_an_idle_machine_gets_bounded_spinning(tmp_path):
    result = run_child(tmp_path, "max 100000\n", STAT_BEFORE)
    assert result["torch_threads"] == len(os.sched_getaffinity(0))
    assert result["env"]["GOMP_SPINCOUNT"] == str(BOUNDED_SPINS)
    assert result["env"]["OMP_WAIT_POLICY"] is None and result["notes"] == []


# --------------------------------------------------------------------------- every heavy command

# Runs a dammerge command and stops it the moment torch is first imported, reporting whether
# dammerge had chosen the thread settings by then (OMP_NUM_THREADS, removed from the child's
# environment, is set by configure_threads and by nothing else).
FIRST_TORCH_IMPORT = """
import json, os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(json.dumps({"configured": "OMP_NUM_THREADS" in os.environ}), flush=True)
            os._exit(0)
        return None
sys.meta_path.insert(0, Watch())
sys.argv = ["dammerge", *sys.argv[1:]]
from dammerge.cli import main
main()
"""


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "{recipe}", "{tmp}/merged"],
        ["family", "build", "{tmp}/family", "--size", "micro"],
        ["experiment", "{recipe}", "-o", "{tmp}/experiment"],
        ["demo", "{tmp}/demo", "--size", "micro"],
    ],
    ids=lambda command: command[0],
)
def test_each_heavy_command_chooses_threads_before_torch_loads(tmp_path, command):
    """torch's OpenMP runtime reads its thread and wait settings once, when it loads: a
    command that imports torch before :func:`configure_threads` runs with OpenMP's defaults."""
    import json

    recipe = write(tmp_path / "recipe.yml", "merge_method: linear\n")
    args = [part.format(recipe=recipe, tmp=tmp_path) for part in command]
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environ["PYTHONPATH"] = str(SOURCE)
    done = subprocess.run(
        [sys.executable, "-c", FIRST_TORCH_IMPORT, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"torch was never imported:\n{done.stdout}\n{done.stderr}"
    assert json.loads(lines[-1]) == {"configured": True}

"""bench/contention.py: its arguments, its dry run, the jobs' environment and the ratios."""

from __future__ import annotations

import pytest

from .loading import load_bench

contention = load_bench("contention")


@pytest.mark.parametrize(
    ("text", "copies"), [("0,1,3", [0, 1, 3]), ("3, 0", [0, 3]), ("0,0,1", [0, 1])]
)
def test_copies_are_read_sorted_and_once(text, copies):
    assert contention.parse_copies(text) == copies


@pytest.mark.parametrize("argv", [["--copies", "1,3"], ["--copies", "x"], ["--repeats", "0"]])
def test_bad_arguments_are_refused_before_anything_runs(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(contention, "WORK", tmp_path / "work")
    with pytest.raises(SystemExit) as info:
        contention.main([*argv, "--dry-run"])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_the_dry_run_lists_every_setting_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(contention, "WORK", tmp_path / "work")
    output = tmp_path / "result.json"
    argv = ["--dry-run", "--copies", "0,1,3", "--baseline", "--repeats", "2"]
    assert contention.main([*argv, "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "job: family build --size micro"
    settings = lines[1:-1]
    assert len(settings) == 2 * 2 * 3  # repeats x variants x copies
    assert settings[0].startswith("dammerge, alone, repeat 0: 1 process(es) at once")
    assert settings[2].startswith("dammerge, beside 3, repeat 0: 4 process(es) at once")
    assert settings[3].startswith("spinning, alone, repeat 0")
    assert "-m dammerge family build" in settings[0] and "--size micro --force" in settings[0]
    assert lines[-1] == f"would write {output}"
    assert not output.exists() and not (tmp_path / "work").exists()


def test_the_quick_job_writes_its_own_result_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(contention, "WORK", tmp_path / "work")
    assert contention.main(["--dry-run", "--quick", "--copies", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "small parallel torch operations" in out.splitlines()[0]
    assert out.splitlines()[-1].endswith("contention_quick.json")


def test_every_job_of_a_setting_has_its_own_fresh_folder(tmp_path):
    setting = contention.Setting("dammerge", 3, 1)
    folders = setting.folders(tmp_path)
    assert len(folders) == 4 == len(set(folders))
    other = contention.Setting("spinning", 3, 1).folders(tmp_path)
    assert not set(folders) & set(other)


def test_jobs_run_without_the_callers_thread_settings():
    caller = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    env = contention.job_environment("dammerge", caller)
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"
    assert not set(contention.CHOSEN_BY_DAMMERGE) & set(env)
    spinning = contention.job_environment("spinning", caller)
    assert spinning["GOMP_SPINCOUNT"] == "300000" and "OMP_WAIT_POLICY" not in spinning
    assert caller["OMP_NUM_THREADS"] == "1"  # the caller's own environment is untouched


def outcome(variant: str, copies: int, seconds: list[float], repeat: int = 0):
    result = contention.Outcome(contention.Setting(variant, copies, repeat))
    result.jobs = [{"job_seconds": s, "wall_seconds": s + 5, "peak_rss_bytes": 1} for s in seconds]
    return result


def test_slowdowns_are_mean_times_beside_copies_over_the_mean_alone():
    outcomes = [
        outcome("dammerge", 0, [8.0]),
        outcome("dammerge", 0, [10.0], repeat=1),  # repeats pool: alone is 9 s
        outcome("dammerge", 1, [18.0, 20.0]),  # 19 / 9
        outcome("dammerge", 3, [50.0, 52.0, 54.0, 60.0]),  # 54 / 9
        outcome("spinning", 0, [9.0]),
        outcome("spinning", 3, [400.0, 380.0, 420.0, 400.0]),
    ]
    assert contention.slowdowns(outcomes, "dammerge") == pytest.approx({1: 19 / 9, 3: 6.0})
    summary = contention.summary(outcomes, ["dammerge", "spinning"])
    assert summary["dammerge"]["alone_seconds"] == 9.0
    assert summary["dammerge"]["slowdown"] == {"1": round(19 / 9, 2), "3": 6.0}
    assert summary["dammerge"]["targets"] == {
        "1": {"at_most": 2.5, "pass": True},
        "3": {"at_most": 6.0, "pass": True},
    }
    assert summary["spinning"]["slowdown"] == {"3": pytest.approx(400 / 9, abs=0.01)}
    assert "targets" not in summary["spinning"]

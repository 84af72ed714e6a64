"""Usage errors and Ctrl-C through the real entry point: one line, a hint, the right exit code."""

from __future__ import annotations

import sys

import pytest

from dammerge import __version__
from dammerge.cli import main
from dammerge.errors import Interrupted


def run_main(monkeypatch, capfd, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["dammerge", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(stderr: str, expected_error: str, expected_hint: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 2, stderr
    assert lines[0].startswith("error: ") and expected_error in lines[0], stderr
    assert lines[1].startswith("hint: ") and expected_hint in lines[1], stderr


@pytest.mark.parametrize(
    ("args", "error", "hint"),
    [
        (["merge", "r.yml", "out", "--devcie", "cpu"], "--devcie", "did you mean --device"),
        (["merge"], "Missing argument", "--help"),
        (["mrege", "r.yml", "out"], "No such command 'mrege'", "--help"),
        (["merge", "r.yml", "out", "--cuda"], "--cuda", "use --device cuda"),
        (["merge", "r.yml", "out", "--out-shard-size", "1B"], "--out-shard-size", "--shard-size"),
        (["merge", "r.yml", "out", "--lazy-unpickle"], "--lazy-unpickle", "--allow-pickle"),
        (["merge", "r.yml", "out", "--copy-tokenizer"], "--copy-tokenizer", "always written"),
        (["merge", "r.yml", "out", "--seed", "x"], "--seed", "--help"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(monkeypatch, capfd, args, error, hint):
    code, out, err = run_main(monkeypatch, capfd, *args)
    assert code == 2
    assert out == ""
    assert_usage_error(err, error, hint)


def test_version(monkeypatch, capfd):
    code, out, _ = run_main(monkeypatch, capfd, "--version")
    assert code == 0 and out.strip() == f"dammerge {__version__}"


def _interrupting_command(note: Interrupted | None):
    def command(*args, **kwargs):
        if note is not None:
            raise note
        raise KeyboardInterrupt

    return command


@pytest.mark.parametrize("kept", [True, False])
def test_ctrl_c_exits_130_with_what_was_kept(monkeypatch, capfd, kept):
    """Typer turns Ctrl-C into a bare exit code; the CLI still says what was kept."""
    import dammerge.dispatch

    monkeypatch.setattr(Interrupted, "last", None)
    note = Interrupted("training stopped; state kept in W", "run it again") if kept else None
    monkeypatch.setattr(dammerge.dispatch, "merge", _interrupting_command(note))
    code, out, err = run_main(monkeypatch, capfd, "merge", "r.yml", "out")
    assert code == 130 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    if kept:
        assert lines == ["interrupted: training stopped; state kept in W", "hint: run it again"]
    else:
        assert len(lines) == 1 and lines[0].startswith("interrupted: nothing was written")

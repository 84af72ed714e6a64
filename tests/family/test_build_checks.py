"""`dammerge family build` refuses an output it cannot write before it computes anything."""

from __future__ import annotations

from dammerge.family import build as build_module

from ..cli_helpers import run_cli


def test_unwritable_family_folders_are_refused_before_the_build(
    unwritable_folder, monkeypatch, capsys
):
    built = []
    monkeypatch.setattr(build_module, "_build_into", lambda *args: built.append(args))
    for out in (unwritable_folder, unwritable_folder / "family"):
        code = run_cli(monkeypatch, "family", "build", out, "--size", "micro")
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot write family folder" in errors[0], err
        assert any(line.startswith("hint:") for line in err.splitlines())
    assert built == []

"""Running the ``dammerge`` command line in the test's own process."""

from __future__ import annotations

import sys


def run_cli(monkeypatch, *args: object) -> int:
    """``dammerge ARGS`` through :func:`dammerge.cli.main`; returns its exit code."""
    from dammerge.cli import main

    monkeypatch.setattr(sys, "argv", ["dammerge", *map(str, args)])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0

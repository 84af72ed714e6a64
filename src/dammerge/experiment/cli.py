"""``dammerge experiment EXPERIMENT.yaml``: run a comparison of merge methods and report it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def experiment_command(
    experiment: Annotated[Path, typer.Argument(help="Experiment file (YAML).")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Report folder (default: next to the file)."),
    ] = None,
    rerun: Annotated[bool, typer.Option(help="Recompute every cell, even finished ones.")] = False,
) -> None:
    """Run every method and seed of EXPERIMENT over its family, evaluate, and write a report.

    Finished cells are kept: re-running after an interruption computes only what is missing.
    """
    from dammerge.threads import configure_threads

    configure_threads()  # before torch loads: it reads the thread settings once
    from dammerge.experiment.config import ExperimentConfig
    from dammerge.experiment.report import print_report
    from dammerge.experiment.runner import run_experiment
    from dammerge.terminal import print_lines

    config = ExperimentConfig.from_yaml(experiment)
    out = output or experiment.with_suffix("")
    report = run_experiment(config, out, rerun=rerun)
    print_report(report)
    print_lines([f"report written to {report}"], style="green")

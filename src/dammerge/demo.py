"""The README's main job: build the miniature family, merge it every way, and score each merge.

``dammerge demo`` runs the shipped quick experiment (``experiment/shipped/quick.yaml``): it
builds the ``small`` family (cached after the first run), scores the base and each specialist,
merges the specialists with Model Soups, task arithmetic, TIES, DARE-TIES, DAM and a short
evolutionary search, scores every merge with ``transformers``, and prints the tables.
``--size micro`` is the fast first run: the same job on the ``micro`` family with tiny budgets
(``experiment/shipped/micro.yaml``).

``--regime near|far`` picks the family's regime (docs/family.md). Each regime has its own
folders, so both live side by side in one output folder: the family in
``OUTPUT/<family>-<regime>`` (``family-far``, ``family-micro-near``, ...) and the report in
``OUTPUT/<experiment>-<regime>/report`` (``quick-far``, ``micro-near``, ...).

``--full`` runs the paper's whole comparison (``small-family.yaml``: 3 seeds, AdaMerging, the
Table 3 ablation) in both regimes (or in the one ``--regime`` names), then writes a summary
that sets every merge against the best single model of its regime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dammerge.errors import DammergeError
from dammerge.terminal import print_lines

SHIPPED = Path(__file__).parent / "experiment" / "shipped"

# The regime of the demo's family when --regime is not given: near, the regime users merge in
# (fine-tunes that stay close to their base; docs/family.md).
DEMO_REGIME = "near"

# The shipped experiment each family size's demo runs, and the stem of its family's folder.
DEMO_SIZES = {"small": ("quick", "family"), "micro": ("micro", "family-micro")}
FULL_EXPERIMENT = "small-family"
SUMMARY_FILE = f"{FULL_EXPERIMENT}-summary.md"


def run_demo(
    output: Path, full: bool = False, size: str = "small", regime: str | None = None
) -> Path:
    """Run the demo of family ``size`` into ``output``; return the report folder (with
    ``full``, the summary file). ``regime`` defaults to :data:`DEMO_REGIME`, or with ``full``
    to both regimes."""
    if size not in DEMO_SIZES:
        raise DammergeError(
            f"unknown demo size {size!r}", f"choose one of: {', '.join(DEMO_SIZES)}"
        )
    if full and size != "small":
        raise DammergeError(
            "--full runs on the small family only", "drop --size, or drop --full for the fast run"
        )
    if full:
        from dammerge.family.manifest import REGIMES

        return run_full_comparison(output, REGIMES if regime is None else (regime,))
    from dammerge.family.build import resolve_spec

    regime = regime or DEMO_REGIME
    resolve_spec(size, regime)  # an unknown regime, or one this size lacks: one line, no work
    experiment, family = DEMO_SIZES[size]
    return run_regime(Path(output).resolve(), experiment, family, regime)


def run_regime(output: Path, experiment: str, family: str, regime: str) -> Path:
    """Run shipped ``experiment`` on the ``regime`` family built into
    ``output/<family>-<regime>``, report into ``output/<experiment>-<regime>``, print the
    report; return its folder."""
    from dammerge.experiment.config import ExperimentConfig
    from dammerge.experiment.report import print_report
    from dammerge.experiment.runner import run_experiment

    config = ExperimentConfig.from_yaml(SHIPPED / f"{experiment}.yaml")
    build = config.build.model_copy(update={"regime": regime}) if config.build else None
    config = config.model_copy(
        update={"family": str(output / f"{family}-{regime}"), "build": build}
    )
    report = run_experiment(config, output / f"{experiment}-{regime}")
    print_report(report)
    print_lines([f"report (Markdown, JSON, HTML, PNG) written to {report}"], style="green")
    return report


def run_full_comparison(output: Path, regimes: Sequence[str]) -> Path:
    """Run the full comparison on the small family of each regime, then write and print the
    summary of both; return the summary file.

    Every regime is checked before anything runs: a regime the small family has no recipe for
    stops here, not after the other regime's hours of work."""
    from dammerge.experiment.runner import check_experiment_folder
    from dammerge.family.build import resolve_spec
    from dammerge.family.manifest import REGIMES
    from dammerge.outputs import check_output_file

    for regime in regimes:
        try:
            resolve_spec("small", regime)
        except DammergeError as exc:
            if regime not in REGIMES:
                raise
            hint = "`dammerge demo --full --regime far` runs the far regime alone"
            raise DammergeError(exc.message, hint) from None
    output = Path(output).resolve()
    for regime in regimes:
        check_experiment_folder(output / f"{FULL_EXPERIMENT}-{regime}")
    summary = check_output_file(output / SUMMARY_FILE, "summary")
    reports = {regime: run_regime(output, FULL_EXPERIMENT, "family", regime) for regime in regimes}
    write_summary(summary, reports)
    return summary


def write_summary(path: Path, reports: dict[str, Path]) -> None:
    """Write and print the table of :func:`dammerge.experiment.report.regimes_summary`."""
    from dammerge.experiment.report import (
        VERSUS_BEST,
        markdown_table,
        print_table,
        regimes_summary,
        table_console,
    )
    from dammerge.outputs import write_text_atomic

    header, body = regimes_summary(reports)
    title = "The full comparison per regime: is a merge worth more than the best single model?"
    where = ", ".join(f"`{report.parent.name}/report/`" for report in reports.values())
    explanation = (
        f"Averages over the domains, mean over seeds. `{VERSUS_BEST}`: a merge's average minus "
        "that of its regime's best single model (the base or the specialist with the highest "
        f"average). The reports: {where}."
    )
    text = f"# {title}\n\n{explanation}\n\n{markdown_table(header, body)}\n"
    write_text_atomic(path, text)
    print_table(table_console(), title, header, body)
    print_lines([f"summary written to {path}"], style="green")

"""The README's main job: build the miniature family, merge it every way, and score each merge.

``dammerge demo`` runs the shipped quick experiment (``experiment/shipped/quick.yaml``): it
builds the ``small`` family (cached after the first run), scores the base and each specialist,
merges the specialists with Model Soups, task arithmetic, TIES, DARE-TIES, DAM and a short
evolutionary search, scores every merge with ``transformers``, and prints the tables.
``--full`` runs the paper's whole comparison instead (3 seeds, AdaMerging, the Table 3 ablation).
``--size micro`` is the fast first run: the same job on the ``micro`` family with tiny budgets
(``experiment/shipped/micro.yaml``), its family in ``output/family-micro``.
"""

from __future__ import annotations

from pathlib import Path

from dammerge.errors import DammergeError
from dammerge.terminal import print_lines

SHIPPED = Path(__file__).parent / "experiment" / "shipped"


# The shipped experiment each family size's demo runs, and the family's folder in the output.
DEMO_SIZES = {"small": ("quick", "family"), "micro": ("micro", "family-micro")}


def run_demo(output: Path, full: bool = False, size: str = "small") -> Path:
    """Run the shipped experiment of family ``size`` with its family in ``output``; return the
    report folder."""
    from dammerge.experiment.config import ExperimentConfig
    from dammerge.experiment.report import print_report
    from dammerge.experiment.runner import run_experiment

    if size not in DEMO_SIZES:
        raise DammergeError(
            f"unknown demo size {size!r}", f"choose one of: {', '.join(DEMO_SIZES)}"
        )
    if full and size != "small":
        raise DammergeError(
            "--full runs on the small family only", "drop --size, or drop --full for the fast run"
        )
    name, family = DEMO_SIZES[size]
    name = "small-family" if full else name
    output = Path(output).resolve()
    config = ExperimentConfig.from_yaml(SHIPPED / f"{name}.yaml")
    config = config.model_copy(update={"family": str(output / family)})
    report = run_experiment(config, output / name)
    print_report(report)
    print_lines([f"report (Markdown, JSON, HTML, PNG) written to {report}"], style="green")
    return report

"""The README's main job: build the miniature family, merge it every way, and score each merge.

``dammerge demo`` runs the shipped quick experiment (``experiment/shipped/quick.yaml``): it
builds the ``small`` family (cached after the first run), scores the base and each specialist,
merges the specialists with Model Soups, task arithmetic, TIES, DARE-TIES, DAM and a short
evolutionary search, scores every merge with ``transformers``, and prints the tables.
``--full`` runs the paper's whole comparison instead (3 seeds, AdaMerging, the Table 3 ablation).
"""

from __future__ import annotations

from pathlib import Path

from dammerge.terminal import print_lines

SHIPPED = Path(__file__).parent / "experiment" / "shipped"


def run_demo(output: Path, full: bool = False) -> Path:
    """Run the shipped experiment with its family in ``output/family``; return the report folder."""
    from dammerge.experiment.config import ExperimentConfig
    from dammerge.experiment.report import print_report
    from dammerge.experiment.runner import run_experiment

    name = "small-family" if full else "quick"
    output = Path(output).resolve()
    config = ExperimentConfig.from_yaml(SHIPPED / f"{name}.yaml")
    config = config.model_copy(update={"family": str(output / "family")})
    report = run_experiment(config, output / name)
    print_report(report)
    print_lines([f"report (Markdown, JSON, HTML, PNG) written to {report}"], style="green")
    return report

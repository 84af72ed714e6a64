"""``dammerge family ...`` commands (registered in ``dammerge.cli``).

Heavy imports (torch, transformers) happen inside the command, so ``dammerge --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dammerge.family.manifest import DEFAULT_REGIME
from dammerge.terminal import print_lines

family_app = typer.Typer(
    no_args_is_help=True,
    help="The miniature model family (base + lang/math/sql specialists), built offline.",
)


@family_app.command("build")
def build_command(
    output: Annotated[Path, typer.Argument(help="Folder to build the family into.")],
    size: Annotated[
        str,
        typer.Option(
            help="micro (for tests: seconds) or small (for the demo: about 8 minutes on 2 idle "
            "cores, then cached); build times in docs/family.md."
        ),
    ] = "small",
    seed: Annotated[int, typer.Option(help="Seed of the data, the language and the weights.")] = 0,
    regime: Annotated[
        str,
        typer.Option(
            help="near (specialists stay close to the base, as community fine-tunes do) or far "
            "(long fine-tunes that move far from it); see docs/family.md."
        ),
    ] = DEFAULT_REGIME,
    force: Annotated[
        bool, typer.Option(help="Rebuild even if OUTPUT holds this family; replace it.")
    ] = False,
) -> None:
    """Build the family: tokenizer, base, three specialists, data splits and a manifest."""
    from dammerge.threads import configure_threads

    configure_threads()  # before torch loads: it reads the thread settings once
    from dammerge.family.build import build_family, resolve_spec

    resolve_spec(size, regime)  # a bad size or regime fails here, before anything is written
    result = build_family(
        output,
        size,
        seed,
        regime=regime,
        force=force,
        report=lambda message: print_lines([message]),
    )
    print_quality(result.manifest)
    if result.cached:
        print_lines([f"reused the family in {result.root} (cache hit)"], style="green")
    else:
        seconds = result.manifest.get("build_seconds", 0.0)
        print_lines([f"family written to {result.root} in {seconds:.0f} s"], style="green")


def print_quality(manifest: dict) -> None:
    """The build's quick quality table: each model (rows) on each domain (columns)."""
    from rich.table import Table

    quality = manifest.get("quality", {})
    scores = quality.get("scores", {})
    if not scores:
        return
    domains = list(next(iter(scores.values())))
    table = Table(
        title=f"quick greedy scores ({quality.get('records_per_domain')} eval records per domain)"
    )
    table.add_column("model")
    for domain in domains:
        table.add_column(f"{domain} ({quality['metrics'][domain]})", justify="right")
    for model, row in scores.items():
        table.add_row(model, *(f"{row[d]:.3f}" for d in domains))
    Console().print(table)

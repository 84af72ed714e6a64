"""``dammerge inspect``: plot and summarise a learned merge's coefficients.

Imports happen inside the command so that ``dammerge --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def inspect_command(
    output_dir: Annotated[Path, typer.Argument(help="Output folder of a DAM/AdaMerging merge.")],
    plots: Annotated[
        Path | None,
        typer.Option(help="Folder for the PNGs (default OUTPUT_DIR/coefficient_plots)."),
    ] = None,
) -> None:
    """Plot learned coefficients per layer, per module type and per model (PNG)."""
    from rich.console import Console
    from rich.table import Table

    from dammerge.learned.inspect import coefficient_rows, plot_coefficients, plots_folder

    plots = plots_folder(output_dir, plots)  # checked writable before anything is read
    console = Console()
    rows, metadata = coefficient_rows(output_dir)
    table = Table(
        "module",
        "participant",
        "mean",
        "std",
        "tensors",
        title=f"{metadata.get('method', 'learned')} coefficients in {output_dir}",
    )
    grouped: dict[tuple[str, str], list] = {}
    for row in rows:
        grouped.setdefault((row.module, row.participant), []).append(row)
    for (module, participant), group in sorted(grouped.items()):
        mean = sum(r.mean for r in group) / len(group)
        std = sum(r.std for r in group) / len(group)
        table.add_row(module, participant, f"{mean:.4f}", f"{std:.4f}", str(len(group)))
    console.print(table)
    for path in plot_coefficients(output_dir, plots):
        console.print(f"wrote {path}", style="green", highlight=False)

"""``dammerge evaluate``: score model folders on a family, or export it as lm-eval tasks.

Heavy imports (torch, transformers) happen inside the command so ``dammerge --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dammerge.errors import DammergeError


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise DammergeError(f"--names {text!r} has an empty name", "write --names a,b,c")
    return names


def evaluate_command(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model folders to score (a family model's name, like 'lang', also works).",
            show_default=False,
        ),
    ] = None,
    family: Annotated[
        Path | None, typer.Option(help="Family folder (manifest.json + eval sets). Required.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score only the first N records of each domain.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Records per forward/generate batch.")] = 16,
    max_new_tokens: Annotated[
        int, typer.Option(help="Longest generated response, in tokens.")
    ] = 128,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the scores as JSON here.")
    ] = None,
    markdown_path: Annotated[
        Path | None, typer.Option("--markdown", help="Write the tables as Markdown here.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a bar chart (PNG) here.")] = None,
    responses: Annotated[
        Path | None, typer.Option(help="Write every generated response (JSONL) here.")
    ] = None,
    names: Annotated[
        str | None, typer.Option(help="Comma-separated labels for the models, in order.")
    ] = None,
    export_lm_eval: Annotated[
        Path | None,
        typer.Option(
            "--export-lm-eval",
            help="Instead of scoring, write the family's eval sets as lm-eval tasks here.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="With --export-lm-eval: replace a non-empty folder.")
    ] = False,
) -> None:
    """Score MODELS on each domain of a family: task score, reference NLL, KL to the specialist.

    The average is the mean score over the specialist domains; the compositional set is shown
    beside it. Use --export-lm-eval DIR to run the same evaluation with lm-evaluation-harness.
    """
    from rich.console import Console

    from dammerge.threads import configure_threads

    configure_threads()
    if family is None:
        raise DammergeError("--family is required", "dammerge evaluate MODEL_DIR... --family DIR")
    if export_lm_eval is not None:
        _export(export_lm_eval, family, models, max_new_tokens, limit, overwrite)
        return
    if not models:
        raise DammergeError("no model folders given", "dammerge evaluate MODEL_DIR... --family DIR")
    from dammerge.evaluate import report
    from dammerge.evaluate.evaluator import evaluate_models

    report.check_output_paths(json_path, markdown_path, responses, plot_path=plot)
    result = evaluate_models(
        models,
        family,
        names=_names(names),
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        dtype=dtype,
    )
    console = Console()
    for table in report.rich_tables(result):
        console.print(table)
    written = []
    for path, write in (
        (json_path, report.write_json),
        (markdown_path, report.write_markdown),
        (responses, report.write_responses),
        (plot, report.write_plot),
    ):
        if path is not None:
            write(result, path)
            written.append(str(path))
    if written:
        Console(stderr=True).print(f"wrote {', '.join(written)}", style="green", markup=False)


def _export(
    out: Path,
    family: Path,
    models: list[str] | None,
    max_new_tokens: int,
    limit: int | None,
    overwrite: bool,
) -> None:
    from rich.console import Console

    from dammerge.evaluate.lm_eval_bridge import export_lm_eval

    if models:
        raise DammergeError(
            "--export-lm-eval writes tasks and scores no model", "drop the model folders"
        )
    exported = export_lm_eval(
        family, out, max_new_tokens=max_new_tokens, limit=limit, overwrite=overwrite
    )
    console = Console(stderr=True)
    console.print(f"lm-eval tasks written to {exported.root}", style="green", markup=False)
    console.print(f"run: {exported.command()}", markup=False, highlight=False)

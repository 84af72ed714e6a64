"""The ``dammerge`` command line: thin wrappers that parse, call the library, and print.

User errors (:class:`DammergeError`) are printed as one ``error:`` line and one ``hint:`` line
with exit code 2; no traceback.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from dammerge.demo import DEMO_REGIME
from dammerge.errors import DammergeError, Interrupted
from dammerge.terminal import print_lines, quiet_libraries
from dammerge.threads import configure_threads

if TYPE_CHECKING:
    from dammerge.registry import MethodEntry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Merge language models fine-tuned from one base: data-free methods and DAM.",
)


def _show_version(value: bool) -> None:
    if value:
        from dammerge import __version__

        print(f"dammerge {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Merge language models fine-tuned from one base: data-free methods and DAM."""


# The registry's seeded methods (`MethodEntry.seeded`), spelt out here because `--help` must not
# import the registry (and torch with it); tests/test_cli_help.py keeps the two in step.
SEED_HELP = (
    "Seed of the random choices: the drops of dare_linear, dare_ties, della and della_linear, "
    "the data order and initialisation of dam and adamerging, and evolve's search."
)


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise DammergeError(f"cannot read size {text!r}", "write e.g. 5GB, 500MB or 1000000")
    number = float(match.group(1))
    unit = (match.group(2) or "").upper().rstrip("B")
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if unit.endswith("I") else 1000
    size = int(number * base ** powers[unit.rstrip("I")])
    if size <= 0:
        raise DammergeError(f"shard size must be positive, got {text!r}")
    return size


@app.command("merge")
def merge_command(
    config: Annotated[Path, typer.Argument(help="YAML merge recipe (mergekit-compatible).")],
    output: Annotated[Path, typer.Argument(help="Folder to write the merged checkpoint into.")],
    device: Annotated[str, typer.Option(help="Where the arithmetic runs: cpu or cuda.")] = "cpu",
    shard_size: Annotated[str, typer.Option(help="Maximum size of one output shard.")] = "5GB",
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Validate and print the plan; write nothing.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Accept .bin pickle checkpoints (loaded with weights_only).")
    ] = False,
) -> None:
    """Merge the models of CONFIG into OUTPUT."""
    configure_threads()  # before torch loads: it reads the thread settings once
    from dammerge.dispatch import merge

    merge(
        config,
        output,
        device=device,
        shard_size=parse_size(shard_size),
        seed=seed,
        overwrite=overwrite,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
    )


@app.command("methods")
def methods_command() -> None:
    """List every merge method: its kind, parameters, what it does, and its paper."""
    from rich.table import Table

    from dammerge.methods import REQUIRED
    from dammerge.registry import REGISTRY

    def fmt(params: dict) -> str:
        return ", ".join(k if v is REQUIRED else f"{k}={v}" for k, v in params.items())

    table = Table("method", "kind", "parameters", "what it does", "paper")
    for entry in REGISTRY.values():
        if entry.data_free is not None:
            method = entry.data_free
            base = "base_model; " if method.requires_base else ""
            base = "base_model optional; " if method.optional_base else base
            models = fmt(method.model_params)
            params = f"{base}per model: {models or '-'}; global: {fmt(method.global_params) or '-'}"
        else:
            params = f"base_model; dataset per model; {_training_keys(entry)}"
        table.add_row(entry.name, entry.kind, params, entry.summary, entry.paper)
    Console().print(table)


TRAINING_DOCS = {"learned": "docs/dam.md", "search": "docs/evolve.md"}
TRAINING_KEYS_SHOWN = ("steps", "lr", "objective", "budget", "fitness", "samples", "workers")


def _training_keys(entry: MethodEntry) -> str:
    """The ``training:`` block of a learned or search method: its main keys and where all of
    them are described."""
    fields = list(entry.settings_model.model_fields) if entry.settings_model else []
    shown = [key for key in TRAINING_KEYS_SHOWN if key in fields]
    return f"training: {', '.join(shown)}, ... ({len(fields)} keys: {TRAINING_DOCS[entry.kind]})"


@app.command("demo")
def demo_command(
    output: Annotated[Path, typer.Argument(help="Folder for family and report.")] = Path(
        "demo-output"
    ),
    full: Annotated[
        bool, typer.Option(help="Run the full comparison, 3 seeds and the ablation, per regime.")
    ] = False,
    size: Annotated[
        str, typer.Option(help="Family: small (the demo) or micro (a fast first run, tiny budgets)")
    ] = "small",
    regime: Annotated[
        str | None,
        typer.Option(help=f"Family regime: near or far (default: {DEMO_REGIME}; --full: both)"),
    ] = None,
) -> None:
    """Build the miniature family, merge its specialists every way, and score each merge."""
    configure_threads()  # before torch loads: it reads the thread settings once
    from dammerge.demo import run_demo

    run_demo(output, full=full, size=size, regime=regime)


# Commands that live with their packages. Each package keeps its typer functions in its own
# ``cli.py`` (imports inside the functions, so ``dammerge --help`` stays fast); one line each here.
# >>> registered commands
from dammerge.evaluate.cli import evaluate_command  # noqa: E402

app.command("evaluate")(evaluate_command)
from dammerge.experiment.cli import experiment_command  # noqa: E402

app.command("experiment")(experiment_command)
from dammerge.learned.cli import inspect_command  # noqa: E402

app.command("inspect")(inspect_command)
from dammerge.family.cli import family_app  # noqa: E402

app.add_typer(family_app, name="family")


# <<< registered commands


def _reports_errors() -> bool:
    """False on the ranks other than 0 of a torchrun launch: errors reach every rank together
    (see dammerge.learned.distributed) and rank 0 alone prints them."""
    if not all(os.environ.get(v) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK")):
        return True
    return os.environ["RANK"] == "0"


# mergekit-yaml's flags, and what does their job here.
MERGEKIT_FLAGS = {
    "--cuda": "use --device cuda",
    "--out-shard-size": "use --shard-size (e.g. --shard-size 5GB)",
    "--lazy-unpickle": "not needed: safetensors are read lazily; .bin pickles need --allow-pickle",
    "--copy-tokenizer": "not needed: the tokenizer is always written (tokenizer_source chooses it)",
    "--allow-crimes": "not needed: dammerge checks architectures itself",
    "--trust-remote-code": "not supported: dammerge loads no model code",
    "--write-model-card": "not needed: a model card is always written",
}


def _print(kind: str, text: str, style: str) -> None:
    print_lines([f"{kind}: {text}"], style=style)


def _usage_hint(exc: typer.TyperException) -> str:
    """A hint for a command-line usage error: mergekit's flags get their dammerge equivalent."""
    option = getattr(exc, "option_name", None)
    if option in MERGEKIT_FLAGS:
        return f"{option} is a mergekit flag: {MERGEKIT_FLAGS[option]}"
    possibilities = getattr(exc, "possibilities", None)
    if possibilities:
        return f"did you mean {' or '.join(sorted(possibilities))}? (see dammerge COMMAND --help)"
    return "see dammerge --help, or dammerge COMMAND --help"


def _interrupted() -> None:
    """Ctrl-C: one line saying what was kept, exit 130."""
    note = Interrupted.last
    if note is None:
        _print("interrupted", "nothing was written (outputs appear only when complete)", "yellow")
    else:
        _print("interrupted", note.message, "yellow")
        if note.hint:
            _print("hint", note.hint, "yellow")
    sys.exit(130)


def main() -> None:
    """Console entry point: run the app, turning user errors into one-line messages.

    User errors (:class:`DammergeError`) and usage errors (a mistyped flag, a missing argument)
    exit 2 with an ``error:`` and a ``hint:`` line; Ctrl-C exits 130 with one line.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_libraries()
    try:
        code = app(standalone_mode=False)
    except DammergeError as exc:
        if not _reports_errors():
            sys.exit(2)
        _print("error", exc.message, "bold red")
        if exc.hint:
            _print("hint", exc.hint, "yellow")
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as exc:  # usage errors of typer's own click
        _print("error", exc.format_message(), "bold red")
        _print("hint", _usage_hint(exc), "yellow")
        sys.exit(getattr(exc, "exit_code", 2))
    if code == 130:  # typer turns Ctrl-C inside a command into this exit code
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()

"""What the engines print: one console on stderr, text printed as it is.

Paths, recipe values and tensor names are not rich markup, and a long plan line must not be
wrapped into two, so every line goes out with markup, highlighting and wrapping off.

The libraries underneath have voices of their own (``transformers``' "Loading weights" and
"Writing model shards" bars, its advisory warnings, ``datasets``' bars): the command line
silences them once, at its entry, with :func:`quiet_libraries`, so its own bars and lines are
the only ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from rich.console import Console

console = Console(stderr=True)

# Read by huggingface_hub, transformers and datasets when they are imported. A value the user
# has set is kept (HF_HUB_DISABLE_PROGRESS_BARS=0 brings transformers' bars back).
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' own bars (Loading weights, ...)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def print_lines(lines: Iterable[str], style: str | None = None) -> None:
    """Print each line as it is (a plan, notes)."""
    for line in lines:
        console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Silence the progress bars and advisory logs of the Hugging Face libraries.

    The switches are environment variables, read when a library is imported, so they also
    reach the processes a command starts (the experiment's merges); a library imported already
    (a Python caller's, a test's) is switched off directly.
    """
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            transformers_logging.disable_progress_bar()
        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            transformers_logging.set_verbosity_error()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        import datasets

        datasets.disable_progress_bars()

"""What the engines print: one console on stderr, text printed as it is.

Paths, recipe values and tensor names are not rich markup, and a long plan line must not be
wrapped into two, so every line goes out with markup, highlighting and wrapping off.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console

console = Console(stderr=True)


def print_lines(lines: Iterable[str], style: str | None = None) -> None:
    """Print each line as it is (a plan, notes)."""
    for line in lines:
        console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)

"""User-facing errors: one line of cause, one line of hint, never a traceback.

Everything a user can get wrong (a bad recipe, a corrupt checkpoint, an output folder that
would overwrite an input) raises :class:`DammergeError`. The CLI prints ``error: <cause>`` and
``hint: <hint>`` and exits non-zero; programming errors still raise ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import ClassVar


class DammergeError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` — did you mean 'x'?`` for the closest of ``choices`` to a misspelt ``word`` (difflib's
    ratio of at least 0.6), or an empty string when none is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1)
    return f" — did you mean '{close[0]}'?" if close else ""


class ConfigError(DammergeError):
    """The merge recipe is invalid (unknown method, parameter, bad value)."""


class CheckpointError(DammergeError):
    """A checkpoint is missing, corrupt, hostile, or incompatible with the others."""


class OutputError(DammergeError):
    """The output location cannot be written safely."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised by code that kept its state, saying what was kept and how to resume.

    It is a ``KeyboardInterrupt``, so Python callers see the interruption they expect; the CLI
    prints its message as one line and exits 130. The command-line framework turns every
    ``KeyboardInterrupt`` into a bare exit code, so the latest one is also kept in
    :attr:`last` for the CLI to read.
    """

    last: ClassVar[Interrupted | None] = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        Interrupted.last = self

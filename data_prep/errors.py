"""Errors that end a prep run with a clear message instead of a traceback.

`run_prep` turns any `PrepError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class PrepError(Exception):
    """A prep run cannot go on; the message says what to fix."""


class PrepOptionsError(PrepError):
    """An unknown, inapplicable, missing or badly typed option."""


class PrepInputError(PrepError):
    """Malformed input; the message names the file and the line (or entry)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem

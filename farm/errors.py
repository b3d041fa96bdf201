"""Errors a user can fix. Each renders as one line: where, what, how to fix.

The CLI prints ``str(error)`` and exits with ``exit_code``; no traceback for user mistakes.
"""

from __future__ import annotations


class FarmError(Exception):
    """Base for every error caused by user input or environment, not by a bug in farm."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.hint = hint

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        field = f"{self.field}: " if self.field else ""
        hint = f" — {self.hint}" if self.hint else ""
        return f"{where}{field}{self.message}{hint}".replace("\n", " ")


class ManifestError(FarmError):
    """The manifest (or a file it names) is invalid."""


class ModelError(FarmError):
    """The model cannot be found, reached or loaded."""


class CatalogError(FarmError):
    """The catalog or a job in it cannot be found or read."""


class ClusterError(FarmError):
    """Ray cannot be started or reached."""

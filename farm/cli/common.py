"""What every farm command shares: the typer app, the output streams, exit codes, output formats
and the option types several commands take."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO, cast

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="farm: render generative-video campaigns on a Ray cluster, catalogued in Parquet.",
    pretty_exceptions_enable=False,
)


class _Stdout:
    """The command's own output stream. Under main() it is the real stdout, and sys.stdout is
    pointed at stderr: Ray prints cluster events (a node died…) to sys.stdout from a background
    thread, and they must not end up inside the JSON a script reads."""

    real: TextIO | None = None

    def write(self, text: str) -> int:
        return (self.real or sys.stdout).write(text)

    def flush(self) -> None:
        (self.real or sys.stdout).flush()

    def isatty(self) -> bool:
        return (self.real or sys.stdout).isatty()


stdout = _Stdout()
# Piped output (scripts, CI logs) gets wide tables instead of rich's 80-column default.
out = Console(file=cast(TextIO, stdout), soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_INTERNAL = 70  # an unexpected error: a bug in farm (sysexits' EX_SOFTWARE); the traceback goes to a log


class Format(StrEnum):
    table = "table"
    json = "json"


ManifestArg = Annotated[Path, typer.Argument(help="The campaign manifest (YAML).", show_default=False)]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table for people, json for scripts.")]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Where videos go; overrides the manifest's output:.")
]
AddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster to use (e.g. 10.0.0.5:6379); default: an embedded local Ray.")
]
ClusterOpt = Annotated[
    str | None, typer.Option("--address", help="Ask this Ray cluster's farm controller (its catalog), HOST:PORT.")
]


def print_json(data: Any) -> None:
    stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

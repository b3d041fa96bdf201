"""farm catalog compact: catalog maintenance."""

from __future__ import annotations

from typing import Annotated

import typer

from farm.cli.common import Format, FormatOpt, out, print_json

catalog_app = typer.Typer(help="Catalog maintenance.", no_args_is_help=True)


@catalog_app.command("compact")
def catalog_compact(
    job: Annotated[str | None, typer.Argument(help="Only this job (default: every job).")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Merge each job's small batch files into one. Safe to interrupt and to run again."""
    from farm import api

    report = api.compact(job)
    if fmt is Format.json:
        print_json(report.__dict__)
        return
    out.print(
        f"{report.partitions} partitions: {report.merged_files} files merged into {report.written_files} "
        f"({report.rows} rows); {report.finished_deletes} leftovers of an interrupted run removed"
    )

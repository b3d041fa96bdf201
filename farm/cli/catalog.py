"""farm catalog compact and farm catalog check: catalog maintenance."""

from __future__ import annotations

from typing import Annotated

import typer

from farm.cli.common import EXIT_FAILED, EXIT_OK, Format, FormatOpt, out, print_json

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


@catalog_app.command("check")
def catalog_check(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list damaged files; move nothing.")] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Read every catalog file; move the damaged ones to quarantine/ and restore the attempt rows of
    a damaged batch from the outputs' commit markers. Exit 1 when damaged files remain (--dry-run)."""
    from farm import api

    report = api.check_catalog(dry_run)
    if fmt is Format.json:
        print_json({**report.__dict__, "damaged": [d.__dict__ for d in report.damaged]})
    else:
        for d in report.damaged:
            where = f"moved to {d.quarantined_to}" if d.quarantined_to else "left in place (--dry-run)"
            out.print(f"damaged: {d.path} ({d.error}) — {where}", markup=False, highlight=False)
        out.print(
            f"{report.files} catalog files read, {len(report.damaged)} damaged; "
            f"{report.restored_rows} attempt rows restored from commit markers"
        )
        if any("/jobs/" in d.path or "/tasks/" in d.path for d in report.damaged if d.quarantined_to):
            out.print("a quarantined job record or task list is rebuilt the next time its manifest is submitted")
    remaining = [d for d in report.damaged if d.quarantined_to is None]
    raise typer.Exit(EXIT_FAILED if remaining else EXIT_OK)
